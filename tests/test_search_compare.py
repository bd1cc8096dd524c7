"""The search under its budget policy (Ray Tune + Optuna) and the leaderboard, end to end with a tiny budget.
One module-scoped comparison; the search's own behaviour (keep the user's configuration, replace a
planted bad one, resume) in its own small runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref

import numpy as np
import pandas as pd
import pytest
from conftest import GENDERTUNE, PROJECT_WORKER_LINE, RAY_PREFIX, prep_sample, whole_console

from gendertune.base.config import ConfigError
from gendertune.cli import main
from gendertune.cluster import tracking
from gendertune.tuning.compare import leaderboard
from gendertune.tuning.compare.config import CompareConfig
from gendertune.tuning.compare.run import run_compare
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.search.run import run_search
from gendertune.tuning.search.space import space_for, trial_config, user_point
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.worker import TIMING_COLUMNS


@pytest.fixture(scope="module")
def prepared(ray_session, synthetic_sample, tmp_path_factory):
    return prep_sample(
        synthetic_sample,
        tmp_path_factory.mktemp("search-prep") / "prep",
        image_size=32,
        split="identity",
        ratios=[0.6, 0.2, 0.2],
    )


def test_augment_strength_scales_the_users_own_augmentation():
    base = TrainConfig.from_dict(
        {
            "data": "d",
            "out": "o",
            "hflip": 0.0,
            "rotation": 30.0,
            "color_jitter": 0.0,
            "random_erasing": 0.0,
            "random_resized_crop": 0.0,
            "zoom": 0.0,
            "translate": 0.0,
            "random_border": 0.0,
        }
    )
    half = trial_config(base, {"augment_strength": 0.5, "lr": 0.01})
    assert half.rotation == 15.0 and half.hflip == 0.0 and half.lr == 0.01  # none stays none
    assert trial_config(base, {"augment_strength": 0.5, "hflip": 0.3}).hflip == 0.3  # searched on its own
    assert trial_config(dataclasses.replace(base, hflip=0.5), {"augment_strength": 0.5}).hflip == 0.5  # never scaled
    none = dataclasses.replace(base, rotation=0.0)
    assert all(v == 0 for v in trial_config(none, {"augment_strength": 1.0}).augment_strengths().values())
    assert trial_config(base, {}).rotation == 30.0  # no strength searched: the base as it is


def test_models_are_searched_side_by_side_only_where_each_gets_a_full_runs_share():
    from gendertune.tuning.compare.run import models_at_once

    cpu = TrainConfig.from_dict({"data": "d", "out": "o"})
    assert models_at_once(0, 4, cpus=2, gpus=0, base=cpu) == 1  # this box: one after another
    assert models_at_once(0, 4, cpus=9, gpus=0, base=cpu) == 2  # at least 4 cores each
    assert models_at_once(0, 4, cpus=64, gpus=0, base=cpu) == 4  # never more than there are models
    wide = dataclasses.replace(cpu, workers=2, cpus_per_worker=4)
    assert models_at_once(0, 4, cpus=24, gpus=0, base=wide) == 3  # a run's 8 CPUs each
    gpu = dataclasses.replace(cpu, gpu=True, workers=2)
    assert models_at_once(0, 4, cpus=8, gpus=4, base=gpu) == 2  # a run's GPUs each, whatever the CPUs
    assert models_at_once(0, 4, cpus=64, gpus=1, base=gpu) == 1
    assert models_at_once(3, 2, cpus=2, gpus=0, base=cpu) == 2  # asked for: as asked, up to the models


def test_side_by_side_searches_that_the_cluster_cannot_place_are_refused():
    from gendertune.tuning.compare.run import require_room_side_by_side

    base = TrainConfig.from_dict({"data": "d", "out": "o", "workers": 2, "cpus_per_worker": 2})
    require_room_side_by_side(2, base, cluster_cpus=9, cluster_gpus=0)  # 2 x 2 x 2 + 1 for data loading
    with pytest.raises(ConfigError, match="models_at_once 3: 3 searches side by side need 13 CPUs"):
        require_room_side_by_side(3, base, cluster_cpus=9, cluster_gpus=0)
    with pytest.raises(ConfigError, match="4 GPUs; the cluster has 9 CPUs and 2 GPUs"):
        require_room_side_by_side(2, dataclasses.replace(base, gpu=True), cluster_cpus=9, cluster_gpus=2)


def test_side_by_side_runs_each_item_in_its_share_at_once_and_keeps_the_order():
    import threading

    from gendertune.cluster.runtime import Share, compute_parallelism
    from gendertune.tuning.compare.run import side_by_side

    both_started = threading.Barrier(2, timeout=10)  # fails unless two items run at the same time

    def work(item):
        if item in ("a", "b"):
            both_started.wait()
        return {"item": item, "cpus": compute_parallelism(), "thread": threading.current_thread().name}

    rows = side_by_side(["a", "b", "c"], work, at_once=2, share=Share(cpus=5, gpus=0))
    assert [r["item"] for r in rows] == ["a", "b", "c"] and {r["cpus"] for r in rows} == {5}
    assert rows[0]["thread"] != rows[1]["thread"]

    def fails(item):
        raise MemoryError(item)

    with pytest.raises(MemoryError):  # what a work function raises is not lost in its thread
        side_by_side(["a"], fails, at_once=2, share=Share(cpus=1, gpus=0))


def compare_configs(prepared, out, **train):
    # vit_b_16 cannot run at 40 px (not a multiple of its 16 px patches): it must become an error row.
    return (
        CompareConfig.from_dict(
            {"data": str(prepared), "out": str(out), "models": ["resnet18", "vit_b_16", "googlenet"], "ensemble_k": 2}
        ),
        # One trial at a time, so the second trial of each model can reuse the first one's actor;
        # the screening decides (one full-length run per model) to keep the suite short.
        SearchConfig.from_dict({"trials": 2, "max_concurrent": 1, "lr_test_steps": 20, "retrain_challenger": False}),
        TrainConfig.from_dict({"data": str(prepared), "out": str(out), "epochs": 1, "image_size": 40, **train}),
    )


@pytest.fixture(scope="module")
def comparison(prepared, eval_set_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    compare, search, base = compare_configs(prepared, out, eval_sets=[f"faces={eval_set_folder}"])
    # Two searches side by side, as a cluster with room for two would run them (this box would
    # run them one after another): everything below holds for side-by-side searches too.
    compare = dataclasses.replace(compare, models_at_once=2)
    with whole_console(out.parent / "console.log"):
        table = run_compare(compare, search, base, tracking_uri=tracking.resolve_uri("auto", str(out)))
    return out, table


def test_trials_print_no_checkpoint_lines_or_dataset_progress_bars(comparison):
    console = (comparison[0].parent / "console.log").read_text()
    assert "Trial status" not in console and "Configuration for experiment" not in console  # no Tune tables
    assert "MLflow database tables" not in console  # the sqlite store's schema set-up
    assert "Progress bars disabled" not in console and "Failed to query Ray Train Controller" not in console
    assert "Checkpoint successfully created" not in console
    assert "Running Dataset" not in console and "execution finished" not in console
    assert "Exception ignored" not in console  # e.g. a trial actor killed inside a Dataset's __del__


def test_two_models_searched_side_by_side_each_plan_with_half_the_cores(comparison):
    from gendertune.cluster.runtime import compute_parallelism

    out, _ = comparison
    summaries = [json.loads((out / "models" / m / "search.json").read_text()) for m in ("resnet18", "googlenet")]
    assert max(s["started_at"] for s in summaries) < min(s["finished_at"] for s in summaries)  # they overlapped
    assert [s["resources"]["cpus"] for s in summaries] == [max(1, compute_parallelism() // 2)] * 2


def test_a_finished_search_keeps_its_results_but_not_its_checkpoints(comparison):
    out, _ = comparison
    searches = out / "searches"
    # Screening trials' and full-length runs' checkpoint folders (Ray Train's snapshot file stays).
    assert not [p for p in searches.rglob("checkpoint_*") if p.is_dir()]
    assert (searches / "googlenet" / "full" / "incumbent").is_dir() or (
        searches / "googlenet" / "full" / "challenger"
    ).is_dir()
    assert len(list((searches / "googlenet" / "search").glob("*/result.json"))) == 2
    assert (out / "models" / "googlenet" / run_layout.MODEL).stat().st_size > 0


def test_in_process_trials_reuse_one_actor(comparison):
    out, _ = comparison
    results = sorted((out / "searches" / "resnet18" / "search").glob("*/result.json"))
    pids = {json.loads(line)["pid"] for path in results for line in path.read_text().splitlines() if line.strip()}
    assert len(results) == 2 and len(pids) == 1, f"{len(results)} trials ran in processes {pids}"


def test_the_search_tries_the_users_own_configuration(comparison, prepared):
    out, _ = comparison
    tried = [json.loads(path.read_text()) for path in (out / "searches" / "resnet18" / "search").glob("*/params.json")]
    base = compare_configs(prepared, out)[2]
    own = user_point(base, space_for("resnet18"))
    assert own["lr"] == base.lr and own["augment_strength"] == 1.0
    assert own in [{key: trial[key] for key in own} for trial in tried]


def _epoch_rows(search_dir) -> list[dict]:
    return [
        json.loads(line)
        for path in search_dir.glob("*/result.json")
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def _assert_start_up_times_in_order(row: dict) -> None:
    # Tune's own `timestamp`, taken when the trial reported the row, is in whole seconds, rounded down.
    assert (
        row["run_started_at"]
        <= row["loop_started_at"]
        <= row["epoch_started_at"]
        <= row["first_step_at"]
        < row["timestamp"] + 1
    ), row
    assert 0 < row["train_seconds"] <= row["time_this_iter_s"], row


def test_in_process_epoch_rows_carry_their_start_up_times_in_order(comparison):
    out, _ = comparison
    rows = _epoch_rows(out / "searches" / "resnet18" / "search")
    assert len(rows) == 2  # two trials of one epoch, the second in the first one's actor
    for row in rows:
        _assert_start_up_times_in_order(row)
    first, second = sorted(rows, key=lambda row: row["run_started_at"])
    assert second["run_started_at"] > first["first_step_at"]  # a reused actor: the trial's own start
    assert set(TIMING_COLUMNS) <= set(pd.read_csv(out / "models" / "resnet18" / run_layout.HISTORY).columns)


def test_a_search_tries_the_points_it_is_given_first_and_train_mode_rows_carry_start_up_times(prepared, tmp_path):
    from gendertune.data_prep.layout import open_prepared

    base = TrainConfig.from_dict(
        {"data": str(prepared), "out": str(tmp_path / "unused"), "epochs": 1, "image_size": 40}
    )
    # batch_size is not in the default space; a [search.space] entry adds it.
    search = SearchConfig.from_dict(
        {"trials": 1, "trial_mode": "train", "lr_test_steps": 20, "space": {"batch_size": ["choice", [16, 64]]}}
    )
    own = user_point(base, space_for("resnet18", search.space))
    point = {**own, "lr": 2.5e-3, "batch_size": 16}
    outcome = run_search(
        "resnet18",
        base,
        search,
        open_prepared(prepared),
        str(tmp_path / "search"),
        resume=False,
        points_to_evaluate=[point],
    )
    # The user's own configuration was not screened, so the given point is the one trained at full length.
    assert point != own and outcome.best_params == point and not outcome.kept
    assert outcome.best_config.lr == 2.5e-3 and outcome.best_config.batch_size == 16
    (row,) = _epoch_rows(tmp_path / "search" / "search")
    _assert_start_up_times_in_order(row)


def test_leaderboard_files_columns_and_ranks(comparison):
    out, table = comparison
    for name in (
        leaderboard.CSV,
        leaderboard.JSON,
        leaderboard.MD,
        "accuracy_ci.png",
        "confusion_matrices.png",
        "accuracy_per_epoch.png",
        "accuracy_vs_speed.png",
        "config.json",
        "eval_faces_accuracy_ci.png",
        "reliability.png",
        "slice_accuracy.png",
    ):
        assert (out / name).stat().st_size > 0, name
    written = leaderboard.read_leaderboard(out)
    columns = list(written.columns)
    assert (
        columns[: len(leaderboard.COLUMNS)] == leaderboard.COLUMNS
        and columns[-len(leaderboard.LAST_COLUMNS) :] == leaderboard.LAST_COLUMNS
    )
    for column in (
        "recall_Female",
        "recall_Male",
        "acc_faces",
        "acc_faces_ci95_low",
        "acc_faces_ci95_high",
        "mcnemar_p_vs_leader_faces",
        "worst_slice_faces",
        "class_recall_gap_faces",
    ):
        assert column in columns, column
    ok = written[(written["status"] == "ok") & (written["kind"] == "model")]
    assert ok["model"].tolist() and set(ok["model"]) == {"resnet18", "googlenet"}
    assert ok["rank"].tolist() == [1, 2]
    assert ok["accuracy"].is_monotonic_decreasing
    assert (ok["ci95_low"] <= ok["accuracy"]).all() and (ok["accuracy"] <= ok["ci95_high"]).all()
    assert (ok["trials_run"] == 2).all()
    # The best configuration's own training time, and the whole search's: two different numbers.
    assert (ok["train_seconds"] > 0).all() and (ok["search_seconds"] > ok["train_seconds"]).all()
    second = ok.iloc[1]
    assert 0 <= second["mcnemar_p_vs_leader"] <= 1 and second["mcnemar_b"] >= 0
    assert json.loads(ok.iloc[0]["best_params"])["lr"] > 0
    assert set(ok["user_config"]) <= {"kept", "replaced"} and (ok["final_epochs"] == 1).all()
    assert len(json.loads((out / leaderboard.JSON).read_text())) == 4  # two models, the ensemble, the error row


def test_a_failing_model_becomes_an_error_row(comparison):
    out, table = comparison
    row = table[table["model"] == "vit_b_16"].iloc[0]
    assert row["status"] == "error" and "multiple of 16" in row["error"]
    assert pd.isna(row["rank"]) and table.iloc[-1]["model"] == "vit_b_16"


def test_every_model_is_scored_on_the_eval_set_with_slices_and_calibration(comparison, eval_set_folder):
    out, table = comparison
    for model in ("resnet18", "googlenet"):
        run_dir = out / "models" / model
        metrics = run_layout.read_metrics(run_dir)
        scores = metrics["eval_sets"]["faces"]
        assert scores["n"] == 60 and scores["no_prediction"] == 1  # the corrupt image: counted, and wrong
        predictions = pd.read_csv(run_dir / run_layout.eval_predictions("faces"))
        assert len(predictions) == 60 and predictions["prob_positive"].isna().sum() == 1
        row = table[table["model"] == model].iloc[0]
        assert row["acc_faces"] == scores["accuracy"] and row["acc_faces_ci95_low"] <= row["acc_faces"]
        columns = {s["column"] for s in metrics["slices"]["faces"]["slices"]}
        assert columns == {
            "age",
            "group",
        }  # the CSV's own columns; the synthetic prep's attributes slice the test split
        assert {s["column"] for s in metrics["slices"]["test"]["slices"]} >= {"Eyeglasses", "Young"}
        assert "Male" not in {s["column"] for s in metrics["slices"]["test"]["slices"]}
        assert metrics["temperature"] > 0 and row["ece_calibrated"] == metrics["ece_calibrated"]
        test = pd.read_csv(run_dir / run_layout.PREDICTIONS)
        assert np.allclose(test["prob_positive"], 1 / (1 + np.exp(-test["margin"] / metrics["temperature"])))
        for name in ("mistakes_test.png", "mistakes_faces.png"):
            assert (run_dir / name).stat().st_size > 0, name


def test_ensemble_row_is_the_mean_of_its_members(comparison):
    out, table = comparison
    row = table[table["kind"] == "ensemble"].iloc[0]
    assert pd.isna(row["rank"]) and set(row["members"].split("+")) == {"resnet18", "googlenet"}
    assert 0 <= row["mcnemar_p_vs_leader"] <= 1
    members = table[table["model"].isin(["resnet18", "googlenet"])]
    assert row["params"] == members["params"].sum()
    assert row["inference_images_per_s"] < members["inference_images_per_s"].min()
    for file, key in ((run_layout.PREDICTIONS, "image_id"), (run_layout.eval_predictions("faces"), "path")):
        probs = [
            pd.read_csv(out / "models" / m / file, dtype={key: str}).set_index(key)["prob_positive"]
            for m in ("resnet18", "googlenet")
        ]
        ensemble = pd.read_csv(out / "ensemble" / file, dtype={key: str}).set_index(key)["prob_positive"]
        assert np.allclose(ensemble, ((probs[0] + probs[1]) / 2).loc[ensemble.index], equal_nan=True)


def test_mlflow_holds_every_trial_and_every_model(comparison):
    from mlflow.tracking import MlflowClient

    out, table = comparison
    client = MlflowClient(tracking.resolve_uri("auto", str(out)))
    experiment = client.get_experiment_by_name(tracking.COMPARE_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("gendertune.kind") == "trial"]
    assert {r.data.tags["gendertune.model"] for r in trials} >= {"resnet18", "googlenet"}
    resnet_trials = [r for r in trials if r.data.tags["gendertune.model"] == "resnet18"]
    assert len(resnet_trials) == 2 and all("lr" in r.data.params for r in resnet_trials)
    assert len(client.get_metric_history(resnet_trials[0].info.run_id, "val_acc")) == 1  # one epoch each
    models = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("gendertune.kind") != "trial"}
    assert set(models) == {"resnet18", "googlenet", "ensemble", "vit_b_16"}
    assert models["vit_b_16"].info.status == "FAILED"
    resnet = models["resnet18"]
    assert resnet.data.metrics["accuracy"] == table.loc[table["model"] == "resnet18", "accuracy"].iloc[0]
    assert "acc_faces" not in resnet.data.metrics and "eval_sets_faces_accuracy" in resnet.data.metrics
    assert "train_seconds" in resnet.data.metrics and "first_step_at" not in resnet.data.metrics  # a timestamp
    files = {f.path for f in client.list_artifacts(resnet.info.run_id)}
    assert {"model.pt", "metrics.json", "leaderboard.csv", "report.html", "mistakes_faces.png"} <= files


def test_resume_scores_an_added_eval_set_without_searching_again(comparison, prepared, eval_set_folder):
    out, _ = comparison
    trials_before = sorted(p.name for p in (out / "searches" / "resnet18" / "search").iterdir())
    compare, search, base = compare_configs(
        prepared, out, eval_sets=[f"faces={eval_set_folder}", f"again={eval_set_folder}"]
    )
    table = run_compare(dataclasses.replace(compare, resume=True), search, base)
    assert sorted(p.name for p in (out / "searches" / "resnet18" / "search").iterdir()) == trials_before
    ok = table[table["status"] == "ok"]
    assert ok["acc_again"].tolist() == ok["acc_faces"].tolist()  # the same folder, the same scores
    assert set(run_layout.read_metrics(out / "models" / "googlenet")["eval_sets"]) == {"faces", "again"}
    # Other settings would mix two experiments in one leaderboard: refused, naming what differs.
    changed = compare_configs(prepared, out, epochs=2)
    with pytest.raises(ConfigError, match=r"train\.epochs: 1 -> 2"):
        run_compare(dataclasses.replace(changed[0], resume=True), *changed[1:])


def test_a_budget_that_cannot_finish_one_epoch_is_refused_in_seconds(prepared, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gendertune")
    compare, search, base = compare_configs(prepared, tmp_path / "cmp")
    started = time.perf_counter()
    table = run_compare(
        dataclasses.replace(compare, models=("resnet18",)), dataclasses.replace(search, time_budget_s=0.01), base
    )
    assert time.perf_counter() - started < 60
    assert any(line.startswith("[plan resnet18] measured ~") for line in caplog.messages), caplog.messages
    row = table.iloc[0]
    assert row["status"] == "error" and "one epoch takes ~" in row["error"] and "budget of 0.01 s" in row["error"]
    assert not (tmp_path / "cmp" / "searches" / "resnet18" / "search").exists()  # no trial was started


def test_best_runs_work_with_predict_and_leaderboard_cli(comparison, synthetic_sample, capsys):
    out, _ = comparison
    run_dir = out / "models" / "resnet18"
    assert run_layout.read_metrics(run_dir)["evaluated_on"] == "test"
    image = synthetic_sample.path / "img_align_celeba" / "000001.jpg"
    assert main(["predict", "--run", str(run_dir), str(image)]) == 0
    assert "000001.jpg" in capsys.readouterr().out
    assert main(["leaderboard", str(out), "--format", "md"]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | " in printed and "McNemar" in printed
    assert main(["leaderboard", str(out / "nothing-here")]) == 2


def test_in_process_trial_restores_from_its_checkpoint_and_resets_for_a_new_trial(prepared, tmp_path):
    """What Tune does with an InProcessTrial after a failure (restore) and between trials (reset)."""
    from ray import tune

    from gendertune.data_prep.layout import open_prepared
    from gendertune.tuning.search.run import InProcessTrial
    from gendertune.tuning.train.data import training_datasets

    data = open_prepared(prepared)
    base = TrainConfig.from_dict(
        {"data": str(prepared), "out": str(tmp_path / "unused"), "epochs": 2, "image_size": 40}
    )
    trial_class = tune.with_parameters(
        InProcessTrial, base=base, data_root=data.root, threads=1, datasets=training_datasets(data, val_fraction=0.15)
    )
    params = {"lr": 1e-3, "batch_size": 16}
    trial = trial_class(config=params)
    assert trial.train()["epoch"] == 1
    saved = trial.save(str(tmp_path / "checkpoint"))
    uninterrupted = trial.train()
    restored_trial = trial_class(config=params)
    restored_trial.restore(saved)
    resumed = restored_trial.train()
    assert resumed["epoch"] == 2 and resumed["attempt_start_epoch"] == 1 and resumed["done"]
    # The checkpoint carries the RNG state, so the resumed epoch is the epoch it would have been.
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert resumed["val_acc"] == uninterrupted["val_acc"]
    assert trial.reset({"lr": 3e-4, "batch_size": 32})
    fresh = trial.train()
    assert fresh["epoch"] == 1 and fresh["attempt_start_epoch"] == 0 and fresh["config"]["batch_size"] == 32
    # Tune's stop() ends the suspended epoch loop (and its dataset iterators) and frees the datasets
    # (their __del__ shuts down their executors) before the actor exits, not in its teardown.
    loop = trial.epochs
    datasets = [weakref.ref(dataset) for dataset in trial.datasets.values()]
    assert loop.gi_frame is not None and all(ref() is not None for ref in datasets)
    trial.stop()
    assert loop.gi_frame is None and all(ref() is None for ref in datasets)


def test_the_screening_runs_training_speed_prices_an_epoch():
    """After each run's warm-up pass: the median images/s of the later passes; with none, every pass."""
    from types import SimpleNamespace

    from gendertune.tuning.search.run import observed_epoch_s

    def trial(speeds):
        return SimpleNamespace(
            metrics_dataframe=pd.DataFrame({"epoch": range(1, len(speeds) + 1), "train_images_per_s": speeds})
        )

    assert observed_epoch_s([trial([50.0, 200.0, 100.0]), trial([10.0])], images=1000) == 1000 / 150
    assert observed_epoch_s([trial([40.0]), trial([80.0]), trial([60.0])], images=600) == 10.0
    assert observed_epoch_s([SimpleNamespace(metrics_dataframe=None)], images=600) is None


def test_tune_warns_of_slow_loop_steps_only_past_seconds_and_a_users_limit_wins():
    # Tune reads its limit as ray.tune is first imported: in a fresh interpreter, as a command runs.
    probe = (
        "import gendertune.tuning.search.run; from ray.tune.utils.util import warn_if_slow as w; print(w('').threshold)"
    )
    env = {name: value for name, value in os.environ.items() if name != "TUNE_WARN_THRESHOLD_S"}
    limits = [
        subprocess.run([sys.executable, "-c", probe], env=extra, capture_output=True, text=True, check=True).stdout
        for extra in (env, {**env, "TUNE_WARN_THRESHOLD_S": "0.25"})
    ]
    assert [float(limit) for limit in limits] == [5.0, 0.25]  # Tune's own default is 0.5 s


def _finished_trials(search_dir):
    done = {}
    for result in search_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("done"):
            done[result.parent.name] = [
                (line["training_iteration"], line["val_acc"], line["time_total_s"]) for line in lines
            ]
    return done


def _trial_dirs(search_dir):
    return [path for path in search_dir.glob("InProcessTrial_*") if path.is_dir()]


def test_interrupted_search_resumes_without_rerunning_finished_trials(prepared, ray_session, tmp_path):
    out = tmp_path / "cmp"
    command = [
        *GENDERTUNE,
        "compare",
        "--data",
        str(prepared),
        "--out",
        str(out),
        "--models",
        "resnet18",
        "--trials",
        "2",
        "--max-concurrent",
        "1",
        "--epochs",
        "1",
        "--lr-test-steps",
        "20",
        "--no-retrain-challenger",
    ]
    # Each run starts its own local Ray, as a user's command does: the tests' Ray listens on
    # loopback only, which Ray's client on Linux cannot attach to (it swaps 127.0.0.1 for the
    # public address), so another process cannot share it.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    search_dir = out / "searches" / "resnet18" / "search"
    deadline = time.monotonic() + 300
    # Interrupt once the second trial has started: Tune starts it only after it has recorded the
    # first as finished (one trial at a time), so the state it saves on Ctrl-C says so. A trial
    # that has written its last result but is still saving its checkpoint is not finished yet.
    while (
        not (_finished_trials(search_dir) and len(_trial_dirs(search_dir)) >= 2)
        and time.monotonic() < deadline
        and process.poll() is None
    ):
        time.sleep(0.2)
    first = _finished_trials(search_dir)
    assert first, "no trial finished before the deadline"
    process.send_signal(signal.SIGINT)  # what Ctrl-C does; Tune saves its state and exits
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert (
        "gendertune compare: interrupted. the resnet18 search was interrupted; run the same command with --resume"
        in stderr
    )
    assert "Traceback" not in stderr
    assert not (out / leaderboard.CSV).exists()

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The whole console of a compare that ran to its end: the driver's project lines go to stdout,
    # so anything on stderr but a worker's project line (Ray forwards those as the worker wrote
    # them) is Ray's, Tune's or a library's; this small run has no real warning to give.
    forwarded = [line for line in resumed.stdout.splitlines() if RAY_PREFIX.match(line)]
    foreign = [line for line in resumed.stderr.splitlines() + forwarded if line.strip()]
    foreign = [line for line in foreign if not PROJECT_WORKER_LINE.match(line)]
    assert foreign == [], "lines that are neither the project's nor a warning to act on:\n" + "\n".join(foreign)
    after = _finished_trials(search_dir)
    assert len(after) == 2
    for name, results in first.items():
        assert after[name] == results, f"finished trial {name} was run again"
    assert leaderboard.read_leaderboard(out).iloc[0]["trials_run"] == 2
    # The Optuna study came back with the search: both trials are in study.db, told once each.
    import optuna

    study = optuna.load_study(study_name="screening", storage=f"sqlite:///{out / 'searches' / 'resnet18' / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [list(t.intermediate_values) for t in study.trials] == [[1], [1]]  # the one epoch each ran


def _trial_results(search_dir) -> list[tuple]:
    """Each trial's params and per-epoch val_acc/val_loss, in the order the trials were created."""
    trials = []
    for result in search_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        params = json.loads((result.parent / "params.json").read_text())
        trials.append(
            (
                lines[0]["date"],
                json.dumps(params, sort_keys=True),
                [(line["val_acc"], line["val_loss"]) for line in lines],
            )
        )
    return [trial[1:] for trial in sorted(trials)]


def test_a_deterministic_compare_repeats_itself_and_a_kept_configuration_is_trains_model(prepared, tmp_path):
    """Same seed, same machine, --deterministic: `train` once, then the same comparison twice (3
    screening trials of 2 epochs). The two comparisons run the same lr curve, the same screening
    trials and the same weights, so they give the same leaderboard, down to each test prediction.
    And nothing screened beats the user's configuration by more than the noise (51 validation
    images: a 2-standard-error guard of about 20 points), so the comparison's model is `train`'s
    model, prediction for prediction. One test for both: each comparison costs minutes here."""
    from gendertune.tuning.train.run import run_training

    settings = {
        "data": str(prepared),
        "model": "resnet18",
        "epochs": 2,
        "batch_size": 16,
        "seed": 5,
        "deterministic": True,
    }
    run_training(TrainConfig.from_dict({**settings, "out": str(tmp_path / "train")}))

    def compare(out):
        return run_compare(
            CompareConfig.from_dict({"data": str(prepared), "out": str(out), "models": ["resnet18"]}),
            SearchConfig.from_dict({"trials": 3, "seed": 5, "lr_test_steps": 20, "retrain_challenger": False}),
            TrainConfig.from_dict({**settings, "out": str(out)}),
        )

    first, second = compare(tmp_path / "a"), compare(tmp_path / "b")
    varies = [c for c in first.columns if c.endswith(("seconds", "images_per_s")) or c == "run_dir"]
    pd.testing.assert_frame_equal(first.drop(columns=varies), second.drop(columns=varies))
    trials = [_trial_results(tmp_path / run / "searches" / "resnet18" / "search") for run in ("a", "b")]
    assert len(trials[0]) == 3 and trials[0] == trials[1]
    predictions = [pd.read_csv(tmp_path / run / "models" / "resnet18" / run_layout.PREDICTIONS) for run in ("a", "b")]
    pd.testing.assert_frame_equal(*predictions)

    run_dir = tmp_path / "a" / "models" / "resnet18"
    summary = json.loads((run_dir / "search.json").read_text())
    assert summary["kept"] and summary["final_epochs"] == 2 and len(summary["full_runs"]) == 1, summary["verdict"]
    # 20 steps on this sample don't get clearly below guessing's loss: the curve is kept, no lr suggested
    assert summary["plan"]["regime"] == "trials" and 0 < len(summary["lr_curve"]["losses"]) <= 20
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "train" / run_layout.PREDICTIONS), predictions[0])
    assert first.iloc[0]["user_config"] == "kept"
    for figure in ("search_lr_range.png", "search_history.png", "search_intermediate.png"):
        assert (run_dir / figure).stat().st_size > 0, figure


def test_deterministic_refuses_trials_at_once(prepared, tmp_path):
    with pytest.raises(ConfigError, match="one trial at a time"):
        run_compare(
            CompareConfig.from_dict({"data": str(prepared), "out": str(tmp_path), "models": ["resnet18"]}),
            SearchConfig.from_dict({"trials": 2, "max_concurrent": 2}),
            TrainConfig.from_dict({"data": str(prepared), "out": str(tmp_path), "deterministic": True}),
        )
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def prepared_learnable(ray_session, tmp_path_factory):
    """1,200 SYNTHETIC images of 600 people (two photos each, as the demo's sample: with fewer people
    no model generalises to new ones), prepped at 32 px: a lr near 1e-3 learns it in a few epochs,
    and its 240 validation images make the guard's noise threshold about 9 points."""
    from gendertune.data_prep.synthetic import make_sample

    root = tmp_path_factory.mktemp("search-learnable")
    sample = make_sample(root / "celeba", n=1200, seed=1, people=600)
    return prep_sample(sample, root / "prep", image_size=32, split="identity", ratios=[0.6, 0.2, 0.2])


def test_a_planted_bad_learning_rate_is_replaced(prepared_learnable, tmp_path):
    """The user's lr is 10,000x too small: a challenger (the lr range test's suggestion when it
    makes one, else the sampler's) wins the screening duel, and the full-length run uses its lr.
    The user's own value, far outside the space's range, was screened as given, not dropped. The
    synthetic faces learn slowly (their cue is weak by design), so five short epochs lift the
    challenger by about 10-20 points on 240 validation images: the guard is set to 1 standard
    error here, not the default 2."""
    from gendertune.data_prep.layout import open_prepared

    base = TrainConfig.from_dict(
        {
            "data": str(prepared_learnable),
            "out": str(tmp_path / "unused"),
            "epochs": 5,
            "batch_size": 16,
            "lr": 1e-7,
            "seed": 1,
        }
    )
    outcome = run_search(
        "resnet18",
        base,
        SearchConfig.from_dict(
            {"trials": 2, "screen_epochs": 5, "lr_test_steps": 150, "retrain_challenger": False, "guard_z": 1.0}
        ),
        open_prepared(prepared_learnable),
        str(tmp_path / "search"),
        resume=False,
    )
    assert len(outcome.trials) == 2 and sorted(outcome.trials["lr"])[0] == 1e-7
    assert not outcome.kept and outcome.verdict.startswith("replaced"), outcome.verdict
    assert outcome.best_config.lr > 1e-5 and outcome.lr_curve["losses"]
    if outcome.lr_curve["suggestion"] is not None:
        assert outcome.best_config.lr == pytest.approx(outcome.lr_curve["suggestion"])
    assert outcome.gain > 0 and outcome.best_config.epochs == 5
