"""gendertune.tuning.search.space and the searcher built from it: conditional ranges, a user's value
outside a range widening it, Optuna told PRUNED for a trial the scheduler stopped."""

from __future__ import annotations

import dataclasses
import warnings

import optuna
import pytest

from gendertune.base.config import ConfigError
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.search.policy import Plan
from gendertune.tuning.search.run import TruthfulOptunaSearch, make_scheduler, make_searcher
from gendertune.tuning.search.space import DEFAULT_SPACE, centre_lr, space_for, suggest, trial_config, user_point, widen
from gendertune.tuning.train.config import TrainConfig

BASE = TrainConfig.from_dict({"data": "d", "out": "o"})


def draws(space: dict, n: int = 30, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trials = []
    for _ in range(n):
        trial = study.ask()
        constants = suggest(trial, space)
        trials.append({**trial.params, **constants})
        study.tell(trial, 0.5)
    return trials


def test_the_lr_range_depends_on_the_optimizer_drawn():
    for point in draws(space_for("resnet18")):
        low, high = DEFAULT_SPACE["lr"][point["optimizer"]][1:]
        assert low <= point["lr"] <= high, point
    assert {p["optimizer"] for p in draws(space_for("resnet18"))} == {"adamw", "sgd"}


def test_a_users_value_outside_the_range_widens_it_and_is_evaluated_as_given():
    base = dataclasses.replace(BASE, lr=2e-5, label_smoothing=0.3)
    space = widen(space_for("resnet18"), user_point(base, space_for("resnet18")))
    assert space["lr"]["adamw"][1] == 2e-5 and space["label_smoothing"][2] == 0.3
    assert space["lr"]["sgd"] == DEFAULT_SPACE["lr"]["sgd"]  # only the user's optimizer's range
    study = optuna.create_study()
    point = user_point(base, space)
    study.enqueue_trial(point)
    trial = study.ask()
    suggest(trial, space)
    assert trial.params == point  # drawn exactly, not dropped
    assert trial_config(base, trial.params).lr == 2e-5


def test_the_lr_range_recentres_on_the_range_tests_suggestion():
    space = centre_lr(space_for("resnet18"), "adamw", 5e-3)
    low, high = space["lr"]["adamw"][1:]
    assert low < 5e-3 < high and high / 5e-3 == pytest.approx(5e-3 / low)
    assert space["lr"]["sgd"] == DEFAULT_SPACE["lr"]["sgd"]


@pytest.mark.parametrize(
    "bad",
    [
        ["loguniform", 1e-2, 1e-4],
        ["loguniform", 0, 1e-3],
        ["uniform", 0.1],
        ["choice", []],
        {"adamw": ["uniform", 1, 0]},
    ],
)
def test_impossible_ranges_are_refused(bad):
    with pytest.raises(ConfigError, match="search.space.lr"):
        space_for("resnet18", {"lr": bad})


def test_the_augmentation_strength_scales_all_but_the_flip():
    strong = trial_config(BASE, {"augment_strength": 1.5})
    assert strong.hflip == BASE.hflip and strong.rotation == pytest.approx(1.5 * BASE.rotation)
    assert trial_config(BASE, {}, image_size=32, epochs=3).epochs == 3


def test_optuna_is_told_pruned_for_a_trial_stopped_before_its_last_epoch(tmp_path):
    search = SearchConfig(seed=1)
    searcher = make_searcher(
        search,
        space_for("resnet18"),
        [user_point(BASE, space_for("resnet18"))],
        n_trials=4,
        max_t=3,
        storage_dir=str(tmp_path),
    )
    assert isinstance(searcher, TruthfulOptunaSearch)
    assert searcher.suggest("a")["lr"] == BASE.lr  # the user's point first
    searcher.suggest("b")
    searcher.suggest("c")
    # As Tune calls it: a result that ends a trial (its last epoch, or the one the scheduler stopped
    # it at) reaches on_trial_complete only; a trial that ends without reporting "done" repeats its
    # last result there.
    searcher.on_trial_complete("a", {"val_acc": 0.6, "training_iteration": 1})  # stopped after 1 of 3
    for epoch in (1, 2):
        searcher.on_trial_result("b", {"val_acc": 0.7 + epoch / 100, "training_iteration": epoch})
    searcher.on_trial_complete("b", {"val_acc": 0.73, "training_iteration": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns of a step reported twice
        for epoch in (1, 2, 3):
            searcher.on_trial_result("c", {"val_acc": 0.5 + epoch / 100, "training_iteration": epoch})
        searcher.on_trial_complete("c", {"val_acc": 0.53, "training_iteration": 3})
    study = optuna.load_study(study_name="screening", storage=f"sqlite:///{tmp_path / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.PRUNED] + [optuna.trial.TrialState.COMPLETE] * 2
    # Each trial's curve reaches its last epoch: the pruned one's cut shows where it was cut.
    assert [t.intermediate_values for t in study.trials] == [
        {1: 0.6},
        {1: 0.71, 2: 0.72, 3: 0.73},
        {1: 0.51, 2: 0.52, 3: 0.53},
    ]
    assert study.best_value == 0.73
    sampler = searcher._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 2


def _plan(trials: int, epochs: int = 3) -> Plan:
    return Plan(
        regime="trials",
        budget_s=0,
        epochs=12,
        final_epochs=12,
        duel_final_epochs=12,
        full_runs=2,
        lr_test=True,
        screen_trials=trials,
        screen_epochs=epochs,
        screen_image_size=32,
        screen_trial_s=10.0,
        concurrent=1,
        planned_s={},
        note="",
    )


def test_asha_cuts_screening_only_with_enough_trials():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    assert isinstance(make_scheduler(SearchConfig(), _plan(8)), ASHAScheduler)
    assert isinstance(make_scheduler(SearchConfig(), _plan(3)), FIFOScheduler)
    assert isinstance(make_scheduler(SearchConfig(scheduler="fifo"), _plan(8)), FIFOScheduler)
    assert isinstance(make_scheduler(SearchConfig(scheduler="asha"), _plan(3)), ASHAScheduler)
    assert isinstance(make_scheduler(SearchConfig(), _plan(8, epochs=1)), FIFOScheduler)  # nothing to cut


def test_the_same_seed_gives_the_same_suggestions():
    def suggestions(seed):
        searcher = make_searcher(
            SearchConfig(seed=seed), space_for("resnet18"), [], n_trials=6, max_t=3, storage_dir=None
        )
        return [searcher.suggest(f"t{i}") for i in range(4)]

    assert suggestions(3) == suggestions(3) and suggestions(3) != suggestions(4)


def test_the_searcher_saves_and_restores_with_its_sqlite_study(tmp_path):
    """What Tune does on --resume: the searcher's state is saved and restored, and the study's
    trials, in study.db, are all still there."""
    searcher = make_searcher(SearchConfig(), space_for("resnet18"), [], n_trials=4, max_t=2, storage_dir=str(tmp_path))
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_acc": 0.8, "training_iteration": 2})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = make_searcher(SearchConfig(), space_for("resnet18"), [], n_trials=4, max_t=2, storage_dir=str(tmp_path))
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.suggest("b")
    restored.on_trial_complete("b", {"val_acc": 0.7, "training_iteration": 2})
    study = optuna.load_study(study_name="screening", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.value for t in study.trials] == [0.8, 0.7]


def test_a_trial_whose_loss_turned_nan_is_failed_and_never_the_challenger():
    """Issue 21: a non-finite loss stops its trial (Tune records the error) and the search goes on:
    that trial is a `failed` row and is never picked, whatever it scored before it diverged; when it
    was the user's own run, the best completed challenger replaces it."""
    import pandas as pd
    from ray.tune import Result

    from gendertune.tuning.search.run import pick_challenger, trial_rows
    from gendertune.tuning.train.engine import NonFiniteLoss

    user = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.0, "augment_strength": 1.0}

    def result(name: str, val_accs: list[float], *, diverged: bool = False, **params) -> Result:
        frame = pd.DataFrame(
            {"epoch": range(1, len(val_accs) + 1), "val_acc": val_accs, "val_loss": [0.5] * len(val_accs)}
        )
        error = NonFiniteLoss("the training loss became nan at step 7") if diverged else None
        return Result(
            metrics={"config": {**user, **params}},
            checkpoint=None,
            error=error,
            path=f"/searches/resnet18/search/{name}",
            metrics_dataframe=frame,
        )

    plan = _plan(3, epochs=2)
    diverging = result("b", [0.95], diverged=True, lr=3e-3)  # best of all at epoch 1, then NaN
    rows = trial_rows([result("a", [0.6, 0.70]), diverging, result("c", [0.6, 0.72], lr=5e-4)], plan)
    assert list(rows["status"]) == ["completed", "failed", "completed"]
    params, verdict, _ = pick_challenger(rows, user, val_images=100)
    assert params["lr"] == 5e-4 and verdict.startswith("kept"), verdict  # c, inside the noise

    rows = trial_rows([result("a", [0.6], diverged=True), result("c", [0.6, 0.62], lr=5e-4)], plan)
    params, verdict, _ = pick_challenger(rows, user, val_images=100)
    assert params["lr"] == 5e-4 and verdict.startswith("replaced: the user's screening run did not complete")
