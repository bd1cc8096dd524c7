"""One model's search under the budget policy (gendertune.tuning.search.policy), on Ray Tune + Optuna.

In order: measure the costs and make the plan (printed, saved as plan.json); the lr range test
(lr_range.py, one Ray task); screening: complete short runs at low fidelity (fewer pixels and
epochs, each finishing its own schedule) of the user's configuration, the lr test's challenger and
Optuna's suggestions, through Ray Tune (ASHA over the screening epochs when there are enough trials,
pruned trials told to Optuna as PRUNED); then the full-length run(s) through `train`'s own code
path (gendertune.tuning.train.run.fit_best), the best challenger replacing the user's configuration
only past the validation noise. The test split is never read here. Two screening trial modes:
- `inprocess`: a single-worker trial runs the epoch loop inside the trial actor, which Tune reuses
  for the next trial (no worker-group start-up, no process start); `auto` picks it for 1 worker;
- `train`: the trial launches a TorchTrainer (Ray 2.60's Tune-launches-Train pattern) and holds
  only a sliver of CPU itself, so trial drivers never starve their own workers on a small box.
An interrupted search resumes: the plan and the lr curve are read back, Tune restores the
screening (finished trials are not re-run) and Ray Train resumes a full-length run from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import ray
import ray.data
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from torch import nn

from gendertune.base.config import ConfigError
from gendertune.base.errors import StageFailed
from gendertune.cluster.runtime import compute_parallelism, gpu_parallelism
from gendertune.cluster.storage import is_file, is_uri, join, read_text, write_bytes
from gendertune.data_prep.layout import PreparedData, open_prepared
from gendertune.models.registry import build_model, get_spec
from gendertune.models.transforms import TrainAugment
from gendertune.models.weights import fetch_hub_weights
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.search.lr_range import lr_range_test
from gendertune.tuning.search.policy import (
    GUARD_Z,
    LR_TOLERANCE,
    Costs,
    Plan,
    calibrated,
    final_run_epochs,
    full_run_s,
    guard_paired,
    guard_unpaired,
    keep_lr,
    plan_search,
    screen_image_size,
)
from gendertune.tuning.search.space import centre_lr, describe, space_for, suggest, trial_config, user_point, widen
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.data import training_datasets
from gendertune.tuning.train.engine import build_optimizer, select_precision, train_one_epoch
from gendertune.tuning.train.run import build_trainer, fit_best, loop_settings, val_correct
from gendertune.tuning.train.worker import epoch_results, load_state_dir, save_state_dir, torch_batches

METRIC = "val_acc"
SEARCH_DIR = "search"
logger = logging.getLogger(__name__)


def resolve_mode(search: SearchConfig, base: TrainConfig) -> str:
    if search.trial_mode == "inprocess" and base.workers > 1:
        raise ConfigError("search.trial_mode inprocess runs one worker per trial; use train for --workers > 1")
    if search.trial_mode == "auto":
        return "inprocess" if base.workers == 1 else "train"
    return search.trial_mode


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before every trial finished (Ctrl-C, SIGTERM): resume it, don't rank it."""


class InProcessSession:
    """TrainSession for a single-process trial: the whole datasets, and the state Tune restored."""

    rank, world_size = 0, 1

    def __init__(self, datasets: dict, device: torch.device, restored: dict | None = None):
        self.datasets, self.device, self.restored = datasets, device, restored

    def restored_state(self) -> dict | None:
        return self.restored

    def batches(self, split, *, batch_size, shuffle_seed):
        return torch_batches(self.datasets[split], batch_size=batch_size, shuffle_seed=shuffle_seed)

    def wrap_model(self, model):
        return model


class InProcessTrial(tune.Trainable):
    """A single-worker trial that runs the epoch loop in its own actor, one epoch per step().

    A class trainable so that Tune can reuse its actor (`reuse_actors`): the next trial only
    resets it (`reset_config`), keeping the process, its imports (torch and torchvision are
    slow to import) and the dataset handles, instead of starting a new actor per trial."""

    def setup(self, config: dict, *, base: TrainConfig, data_root: str, threads: int, datasets: dict) -> None:
        self.run_started_at = time.time()  # first: the rows' run_started_at includes the set-up below
        # Ray Train's INFO line per checkpoint, which build_trainer's LoggingConfig turns off in
        # train mode: Tune's table already says each trial's progress.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        torch.set_num_threads(threads)
        self.base, self.datasets = base, datasets
        self.prepared = open_prepared(data_root)
        self._begin(config, restored=None)

    def _begin(self, params: dict, *, restored: dict | None) -> None:
        """Start the run of `params` (lazily: epoch_results does nothing before the first step)."""
        self.params = params
        self.train_config = trial_config(self.base, params)
        settings = loop_settings(self.train_config, self.prepared)
        device = torch.device("cuda" if self.train_config.gpu and torch.cuda.is_available() else "cpu")
        self.epochs = epoch_results(
            self.train_config,
            image_size=settings["image_size"],
            steps_per_epoch=settings["steps_per_epoch"],
            session=InProcessSession(self.datasets, device, restored),
            run_started_at=self.run_started_at,
        )
        self.latest_state: dict | None = None

    def step(self) -> dict:
        row, self.latest_state = next(self.epochs)
        return {
            **row,
            "node_id": ray.get_runtime_context().get_node_id(),
            "done": row["epoch"] >= self.train_config.epochs,
        }

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        save_state_dir(self.latest_state, checkpoint_dir)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self._begin(self.params, restored=load_state_dir(checkpoint_dir))

    def reset_config(self, new_config: dict) -> bool:
        self.run_started_at = time.time()
        self._begin(new_config, restored=None)
        return True

    def cleanup(self) -> None:
        # Tune gives a stopping trial actor 10 s to exit, then kills it, and Ray's SIGTERM handler
        # raises SystemExit in whatever runs at that moment: inside a Dataset's __del__ (which shuts
        # down the executor of its last iteration) during the interpreter's teardown that printed a
        # traceback on the console. Ending the epoch loop and dropping the datasets here, in Tune's
        # stop(), runs those __del__s while Ray is healthy, and the actor then exits at once.
        self.epochs.close()
        self.epochs = self.latest_state = self.datasets = None
        gc.collect()


def run_trial(params: dict, *, base: TrainConfig, data_root: str, trials_dir: str, datasets: dict) -> None:
    """The Tune trainable of `train` mode: one TorchTrainer run with the sampled parameters."""
    started_at = time.time()
    config = trial_config(base, params)
    prepared = open_prepared(data_root)
    trial_id = tune.get_context().get_trial_id()
    # A stable name (no timestamp): a resumed trial finds its Train run and resumes it too.
    build_trainer(
        config,
        prepared,
        storage_path=trials_dir,
        name=f"train-{trial_id}",
        callbacks=[TuneReportCallback()],
        datasets=datasets,
        run_started_at=started_at,
    ).fit()


class TrialSummary(tune.Callback):
    """One line per finished, pruned or failed trial, to this module's logger."""

    def __init__(self, model: str, max_epochs: int):
        self.model, self.max_epochs = model, max_epochs

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        epochs = result.get("training_iteration", 0)
        status = "finished" if epochs >= self.max_epochs else f"pruned by ASHA after {epochs} epoch(s)"
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        logger.info(
            f"[search {self.model}] trial {trial.trial_id} {status}: val_acc {result.get(METRIC, float('nan')):.4f} ({params})"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        logger.warning(f"[search {self.model}] trial {trial.trial_id} failed: {_error_line(trial.error_file)}")


def _error_line(error_file: str | None) -> str:
    """The exception's own line from Tune's error.txt (its last line), not the whole traceback."""
    lines = Path(error_file).read_text().strip().splitlines() if error_file and Path(error_file).is_file() else []
    return lines[-1] if lines else "no error text was saved"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _fit_noting_interrupts(tuner: tune.Tuner):
    """Run the search; also say whether Ctrl-C stopped it.

    Tune catches SIGINT itself, saves its state and returns as if done; its handler puts back the
    handler it found. So with a sentinel installed first, finding the sentinel back afterwards
    means Tune's handler fired.
    """

    def sentinel(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False  # signals only reach the main thread; Tune installs none either
    previous = signal.signal(signal.SIGINT, sentinel)
    try:
        results = tuner.fit()
        return results, signal.getsignal(signal.SIGINT) is sentinel
    finally:
        signal.signal(signal.SIGINT, previous)


def check_search(model: str, base: TrainConfig, search: SearchConfig) -> None:
    """What would otherwise fail only inside the trials, checked on the driver before Ray starts:
    the space's entries, its constants applied to the base settings, ImageNet weights on disk."""
    space = space_for(model, search.space)  # each entry a valid domain
    constants = {name: spec for name, spec in space.items() if not isinstance(spec, list | dict)}
    try:
        trial_config(dataclasses.replace(base, model=model), constants)
    except ConfigError as err:
        raise ConfigError(f"search.space constants {constants}: {err}") from None
    if base.deterministic and search.max_concurrent > 1:
        raise ConfigError(
            f"search.max_concurrent {search.max_concurrent} with train.deterministic: a deterministic "
            "search runs one trial at a time; drop one of the two"
        )
    if base.pretrained:
        fetch_hub_weights(get_spec(model))


def measure_images_per_s(config: TrainConfig, image_size: int, *, threads: int, steps: int = 6) -> float:
    """Training throughput of `config`'s model: the median of `steps` timed single steps on random
    images after two warm-up steps (Ray-free; run it where a trial would run, with the threads a
    trial gets). The median of single steps, not one timed stretch: on a shared machine a stretch
    takes whatever else ran during it, and one slow spell must not shorten the final run's plan."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if config.gpu and torch.cuda.is_available() else "cpu")
    spec = get_spec(config.model)
    model = build_model(config.model, image_size=image_size).to(device=device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, 256, (config.batch_size, image_size, image_size, 3), dtype=torch.uint8, generator=generator),
        torch.randint(0, 2, (config.batch_size,), generator=generator),
    )
    step = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        # The run's own augmentation, part of every training step's cost on a CPU: a plan timed
        # without it underestimates the final run, which then overruns its share of the budget.
        "augment": TrainAugment(image_size=image_size, mean=spec.mean, std=spec.std, **config.augment_strengths()),
        "criterion": nn.CrossEntropyLoss(),
        "aux_weight": spec.aux_loss_weight,
        "precision": select_precision(config.precision, device),
        "scaler": None,
        "grad_clip": 0.0,
        "device": device,
    }
    train_one_epoch(batches=[batch] * 2, **step)  # warm-up: allocator, kernels, lazy init
    return float(np.median([train_one_epoch(batches=[batch], **step).images_per_s for _ in range(steps)]))


# ---- the plan ----------------------------------------------------------------------------------------

# Cores a CPU run uses well: a screening trial's, and a side-by-side search's, smallest share.
CORES_PER_TRIAL = 4
RUN_START_S = 25.0  # a Ray Train run's start-up and checkpointing on a small machine (ray-2.60 notes: 20-40 s)
PLAN_FILE, LR_FILE, STUDY_FILE, FINAL_FILE = "plan.json", "lr_range.json", "study.db", "final.json"


def measure_costs(
    base: TrainConfig, prepared: PreparedData, *, image_size: int, screen_size: int, threads: int, lr_test_steps: int
) -> Costs:
    """The plan's costs from timed steps at both fidelities, where and as a run would train."""
    task = ray.remote(_measure_both).options(num_cpus=base.cpus_per_worker, num_gpus=1 if base.gpu else 0)
    full, screen = ray.get(task.remote(base, image_size, screen_size, threads))
    full, screen = full * base.workers, screen * base.workers
    epoch = _epoch_images(prepared, base)
    held_out = _val_images(prepared, base) + prepared.manifest["splits"].get("test", {}).get("count", 0)
    return Costs(
        epoch_s=epoch / full,
        screen_epoch_s=epoch / screen,
        lr_test_s=lr_test_steps * base.batch_size / screen + 5.0,
        run_overhead_s=RUN_START_S + held_out / 3 / full,
    )


def _measure_both(base: TrainConfig, image_size: int, screen_size: int, threads: int) -> tuple[float, float]:
    return (
        measure_images_per_s(base, image_size, threads=threads),
        measure_images_per_s(base, screen_size, threads=threads),
    )


def screening_concurrency(search: SearchConfig, base: TrainConfig) -> int:
    """Screening trials at once, within this search's share of the cluster (runtime.resource_share).
    GPU trials: one per GPU. CPU trials: one per CORES_PER_TRIAL cores (small-batch convolutions
    scale well to about 4 threads, and one trial with every thread returns its result first, which
    the sampler can use), never more than the CPUs hold. Deterministic: one."""
    if base.deterministic:
        return 1
    if search.max_concurrent:
        return search.max_concurrent
    if base.gpu:
        return max(1, gpu_parallelism() // base.workers)
    return max(1, compute_parallelism() // max(CORES_PER_TRIAL, math.ceil(base.cpus_per_worker * base.workers)))


def make_plan(model: str, base: TrainConfig, search: SearchConfig, prepared: PreparedData) -> Plan:
    started = time.perf_counter()
    image_size = loop_settings(base, prepared)["image_size"]
    spec = get_spec(model)
    screen_size = screen_image_size(image_size, spec.min_input_size)
    concurrent = screening_concurrency(search, base)
    costs = measure_costs(
        base,
        prepared,
        image_size=image_size,
        screen_size=screen_size,
        threads=max(1, compute_parallelism() // base.workers),
        lr_test_steps=search.lr_test_steps,
    )
    costs = dataclasses.replace(costs, planning_s=time.perf_counter() - started)
    logger.info(
        f"[plan {model}] measured ~{costs.epoch_s:.0f} s per epoch at {image_size} px, ~{costs.screen_epoch_s:.0f} s "
        f"at {screen_size} px, ~{costs.run_overhead_s:.0f} s per run besides its epochs"
    )
    try:
        plan = plan_search(
            costs,
            epochs=base.epochs,
            budget_s=search.time_budget_s,
            trials=search.trials,
            screen_epochs=min(base.epochs, search.screen_epochs or max(2, base.epochs // 4)),
            screen_size=screen_size,
            concurrent=concurrent,
            retrain_challenger=search.retrain_challenger,
        )
    except ValueError as err:
        raise StageFailed(
            f"{model}: {err}; give it more time, or fewer images, a smaller --image-size or --batch-size"
        ) from None
    logger.info(f"[plan {model}] {plan.note} (~{plan.total_s:.0f} s planned)")
    return plan


# ---- Optuna, told the truth --------------------------------------------------------------------------


class TruthfulOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial the scheduler stopped early is PRUNED, not COMPLETE
    with its early score (Ray's own class reports every stopped trial as COMPLETE, so TPE would
    model "good after one epoch" as "good"). Every epoch's value reaches Optuna as an intermediate
    value, the last one included."""

    def __init__(self, *args, max_t: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_t = max_t
        self._last_reported: dict[str, int] = {}  # trial -> the last epoch told to Optuna

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        self._last_reported[trial_id] = result["training_iteration"]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Tune hands the result that ends a trial (its schedule's last epoch, or the epoch the
        # scheduler stopped it at) to this method only: without it Optuna's curve of every trial
        # would end an epoch early, and a one-epoch screening would have none to plot.
        if (
            result
            and not error
            and self.metric in result
            and trial_id not in self._completed_trials
            and self._last_reported.get(trial_id) != result.get("training_iteration")
        ):
            self.on_trial_result(trial_id, result)
        stopped_early = result and not error and result.get("training_iteration", self._max_t) < self._max_t
        if stopped_early and trial_id not in self._completed_trials:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def make_searcher(
    search: SearchConfig, space: dict, points: list[dict], *, n_trials: int, max_t: int, storage_dir: str | None
) -> OptunaSearch:
    """Optuna over the define-by-run `space`, the named points first. TPE set up for the trials
    that will run: a third of them random start-up (at least 2), multivariate over the conditional
    space, and constant liar so concurrent trials don't draw the same point. The study lives in
    `storage_dir`/study.db (sqlite) when the search writes to a folder, so it can be read and resumed."""
    optuna.logging.set_verbosity(
        optuna.logging.WARNING
    )  # no "study created" / per-trial INFO lines: Tune's table says it
    with warnings.catch_warnings():  # `group` and `constant_liar` are "experimental" in Optuna, and long stable
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=search.seed, n_startup_trials=max(2, n_trials // 3), multivariate=True, group=True, constant_liar=True
        )
    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(storage_dir) / STUDY_FILE}") if storage_dir else None
    return TruthfulOptunaSearch(
        space=functools.partial(suggest, space=space),
        metric=METRIC,
        mode="max",
        sampler=sampler,
        points_to_evaluate=points,
        max_t=max_t,
        storage=storage,
        study_name="screening",
    )


def make_scheduler(search: SearchConfig, plan: Plan):
    """ASHA over the screening epochs when there are enough trials for its cuts to mean anything
    (`auto`: 6 or more); otherwise FIFO, i.e. every screening run completes its short schedule."""
    use_asha = search.scheduler == "asha" or (search.scheduler == "auto" and plan.screen_trials >= 6)
    if not use_asha or plan.screen_epochs < 2:
        return tune.schedulers.FIFOScheduler()
    return ASHAScheduler(
        metric=METRIC,
        mode="max",
        time_attr="training_iteration",
        max_t=plan.screen_epochs,
        grace_period=min(search.grace_period, plan.screen_epochs - 1),
        reduction_factor=search.reduction_factor,
    )


# ---- the parts ---------------------------------------------------------------------------------------


def lr_range_task(
    config: TrainConfig, data_root: str, *, image_size: int, steps: int, threads: int, datasets: dict
) -> dict:
    """Ray task body: the lr range test of `config`'s model and optimizer on training batches."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if config.gpu and torch.cuda.is_available() else "cpu")
    spec = get_spec(config.model)
    model = build_model(config.model, image_size=image_size).to(device=device, memory_format=torch.channels_last)
    augment = TrainAugment(image_size=image_size, mean=spec.mean, std=spec.std, **config.augment_strengths())
    generator = torch.Generator().manual_seed(config.seed)
    batches = itertools.islice(
        torch_batches(datasets["train"], batch_size=config.batch_size, shuffle_seed=config.seed), steps
    )
    curve = lr_range_test(
        model,
        batches,
        optimizer=build_optimizer(model, config),
        augment=lambda images: augment(images, generator=generator),
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        aux_weight=spec.aux_loss_weight,
        device=device,
        steps=steps,
    )
    return curve.to_dict()


def screen(
    model: str,
    screen_base: TrainConfig,
    search: SearchConfig,
    plan: Plan,
    prepared: PreparedData,
    out_dir: str,
    *,
    space: dict,
    points: list[dict],
    resume: bool,
    callbacks: list | None,
    datasets: dict,
    mode: str,
    budget_s: float,
) -> list:
    """The screening trials: complete short runs at low fidelity, through Ray Tune. Returns Tune's results."""
    threads = max(1, compute_parallelism() // plan.concurrent)
    if mode == "inprocess":
        trainable = tune.with_parameters(
            InProcessTrial, base=screen_base, data_root=prepared.root, threads=threads, datasets=datasets
        )
    else:
        trainable = tune.with_parameters(
            run_trial, base=screen_base, data_root=prepared.root, trials_dir=join(out_dir, "trials"), datasets=datasets
        )
    cpus = screen_base.cpus_per_worker if mode == "inprocess" else 0.01
    trainable = tune.with_resources(
        trainable, {"cpu": cpus, "gpu": (1 if screen_base.gpu else 0) if mode == "inprocess" else 0}
    )
    # The console carries TrialSummary's lines, not Tune's: its new output engine prints the
    # experiment table and TensorBoard hint even at verbose=0, the legacy one honours it. Epochs of
    # seconds checkpoint every epoch by design, which Tune would warn about as too frequent.
    # A user's own setting of either variable wins.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    path = join(out_dir, SEARCH_DIR)
    if resume and tune.Tuner.can_restore(path):
        logger.info(f"[search {model}] resuming the screening in {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            # metric/mode go to the searcher and scheduler, not TuneConfig: there Tune ranks the
            # trials itself on return and raises KeyError when an interrupted one has no metric yet.
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(
                    search,
                    space,
                    points,
                    n_trials=plan.screen_trials,
                    max_t=plan.screen_epochs,
                    storage_dir=None if is_uri(out_dir) else out_dir,
                ),
                scheduler=make_scheduler(search, plan),
                num_samples=plan.screen_trials,
                max_concurrent_trials=plan.concurrent,
                time_budget_s=budget_s or None,
                reuse_actors=mode == "inprocess",
            ),
            run_config=tune.RunConfig(
                name=SEARCH_DIR,
                storage_path=out_dir,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, **({"checkpoint_frequency": 1} if mode == "inprocess" else {})
                ),
                failure_config=tune.FailureConfig(max_failures=screen_base.max_failures),
                callbacks=[TrialSummary(model, plan.screen_epochs), *(callbacks or [])],
                verbose=0,
            ),
        )
    results, interrupted = _fit_noting_interrupts(tuner)
    if interrupted:
        # Tune returns normally after Ctrl-C, with unfinished trials: that is no result to rank.
        raise SearchInterrupted(
            f"the {model} search was interrupted; run the same command with --resume to continue it"
        )
    return list(results)


def trial_rows(results: list, plan: Plan) -> pd.DataFrame:
    """One row per screening trial: its parameters, epochs run, final val accuracy and status."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        epochs = int(frame["epoch"].max()) if "epoch" in frame and len(frame) else 0
        last = frame.sort_values("epoch").iloc[-1] if epochs else {}
        status = (
            "failed"
            if result.error is not None
            else "completed"
            if epochs >= plan.screen_epochs
            else "pruned"
            if epochs
            else "not started"
        )
        rows.append(
            {
                "trial_id": result.path.rstrip("/").rsplit("/", 1)[-1] if result.path else "",
                "params": describe(_searched(result.config)),
                **_searched(result.config),
                "fidelity": f"{plan.screen_image_size} px x {plan.screen_epochs} epochs",
                "epochs_run": epochs,
                "val_acc": float(last[METRIC]) if epochs else float("nan"),
                "val_loss": float(last["val_loss"]) if epochs else float("nan"),
                "status": status,
                "history": frame[[c for c in ("epoch", METRIC, "val_loss") if c in frame]].to_dict("records"),
            }
        )
    return pd.DataFrame(rows)


def _searched(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("__")}


@dataclasses.dataclass
class FullRun:
    label: str  # "incumbent" or "challenger"
    config: TrainConfig
    params: dict
    state: dict
    best: dict
    seconds: float


def full_run(label: str, config: TrainConfig, params: dict, prepared: PreparedData, out_dir: str) -> FullRun:
    """One full-length run through `train`'s own code path (Ray Train, all threads, best epoch by
    validation), in OUT/searches/<model>/full/<label>; a resumed search finishes it from its checkpoint."""
    started = time.perf_counter()
    logger.info(f"[search {config.model}] full-length run of the {label} ({config.epochs} epochs): {describe(params)}")
    state, best = fit_best(config, prepared, storage_path=join(out_dir, "full", label))
    return FullRun(label, config, params, state, best, time.perf_counter() - started)


# ---- the search --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchOutcome:
    best_config: TrainConfig  # the configuration on the leaderboard, at full length
    best_params: dict
    best_state: dict  # its best-by-validation checkpoint (weights + full history)
    best_metrics: dict
    kept: bool  # the user's configuration was kept
    verdict: str  # why it was kept or replaced
    gain: float  # validation accuracy of the best challenger minus the user's, where compared (else NaN)
    plan: Plan
    actual_s: dict[str, float]  # what each part took
    trials: pd.DataFrame  # trial_rows
    lr_curve: dict | None  # the lr range test's curve and suggestion
    full_runs: list[dict]  # label, params, epochs, best val acc, seconds of each full-length run
    resources: dict  # the CPU cores and GPUs the search planned with (its share when side by side)
    span: tuple[float, float]  # when the search started and ended (Unix seconds): side by side, they overlap

    @property
    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.best_state["history"])

    def summary(self) -> dict:
        """What search.json and the leaderboard carry (plain JSON)."""
        chosen = next(run for run in self.full_runs if run["label"] == ("incumbent" if self.kept else "challenger"))
        return {
            "plan": dataclasses.asdict(self.plan),
            "actual_s": self.actual_s,
            "kept": self.kept,
            "verdict": self.verdict,
            "gain": self.gain,
            "final_seconds": chosen["seconds"],
            "best_params": describe_params(self.best_params),
            "final_epochs": self.best_config.epochs,
            "lr_curve": self.lr_curve,
            "full_runs": self.full_runs,
            "resources": self.resources,
            "started_at": self.span[0],
            "finished_at": self.span[1],
            "trials": json.loads(self.trials.to_json(orient="records")),
        }


def run_search(
    model: str,
    base: TrainConfig,
    search: SearchConfig,
    prepared: PreparedData,
    out_dir: str,
    *,
    resume: bool,
    callbacks: list | None = None,
    points_to_evaluate: list[dict] | None = None,
) -> SearchOutcome:
    """Search `model` under the budget policy (gendertune.tuning.search.policy) and return the
    configuration to put on the leaderboard with its full-length run. `out_dir` (a folder or a URI)
    holds the plan, the lr curve, the Tune state, the Optuna study and the full-length runs;
    `callbacks` are more Tune callbacks (e.g. tracking's MLflow logger); `points_to_evaluate` are
    the configurations screened first, in order (default: the user's, then the lr test's challenger)."""
    started, started_at = time.perf_counter(), time.time()
    base = dataclasses.replace(base, model=model)
    loop_settings(base, prepared)  # image size vs model, weights file: fail before any trial
    mode = resolve_mode(search, base)
    if not is_uri(out_dir):
        out_dir = str(Path(out_dir).absolute())
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    saved_plan = _read_json(out_dir, PLAN_FILE) if resume else None
    plan = Plan(**saved_plan) if saved_plan else make_plan(model, base, search, prepared)
    write_json(join(out_dir, PLAN_FILE), dataclasses.asdict(plan))
    actual: dict[str, float] = {"planning": time.perf_counter() - started}
    # Built (and, when small, materialised) once for the whole search. A Dataset executes with the
    # DataContext it was created with: switched off here, its progress bars stay off in the trials too.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = training_datasets(prepared, val_fraction=base.val_fraction)
    space = space_for(model, search.space)
    user = user_point(base, space)
    points = [user]
    lr_curve = None
    if plan.lr_test:
        lr_curve = _read_json(out_dir, LR_FILE) if resume else None
        if lr_curve is None:
            part = time.perf_counter()
            task = ray.remote(lr_range_task).options(num_cpus=base.cpus_per_worker, num_gpus=1 if base.gpu else 0)
            lr_curve = ray.get(
                task.remote(
                    base,
                    prepared.root,
                    image_size=plan.screen_image_size,
                    steps=search.lr_test_steps,
                    threads=compute_parallelism(),
                    datasets=datasets,
                )
            )
            write_json(join(out_dir, LR_FILE), lr_curve)
            actual["lr_test"] = time.perf_counter() - part
        suggestion = lr_curve["suggestion"]
        if suggestion is None:
            logger.info(
                f"[search {model}] lr range test: in {search.lr_test_steps} steps the loss never got clearly "
                f"below guessing's, so it suggests nothing; the user's lr {base.lr:g} stands"
            )
        elif keep_lr(base.lr, suggestion):
            logger.info(
                f"[search {model}] lr range test: suggests {suggestion:.2g}; the user's lr {base.lr:g} is within "
                f"{LR_TOLERANCE:g}x of it: kept"
            )
        else:
            logger.info(
                f"[search {model}] lr range test: suggests {suggestion:.2g}, the user's lr {base.lr:g} is not "
                f"within {LR_TOLERANCE:g}x of it: a challenger with lr {suggestion:.2g}"
            )
            points.append({**user, "lr": suggestion})
        if suggestion is not None:
            space = centre_lr(space, base.optimizer, suggestion)
    space = widen(space, user)
    if points_to_evaluate is not None:
        points = points_to_evaluate
    screen_base = dataclasses.replace(base, image_size=plan.screen_image_size, epochs=plan.screen_epochs)
    trials = pd.DataFrame()
    challenger_params, verdict, gain = (
        None,
        "kept: no screening, the budget holds the user's configuration alone",
        math.nan,
    )
    # Screening runs when the plan has room for it, or, at about one run's budget, as a duel with
    # the lr test's challenger only (its time is taken from the final run, at most MAX_FINAL_TRIM).
    n_screen = plan.screen_trials or (2 if len(points) > 1 and plan.lr_test else 0)
    if n_screen:
        part = time.perf_counter()
        # Screening's share, with slack for measurement error: the final run's time is protected by
        # stopping screening, never by cutting that run short.
        limit = (math.ceil(n_screen / plan.concurrent) * plan.screen_trial_s * 1.5 + 10) if plan.budget_s else 0
        results = screen(
            model,
            screen_base,
            search,
            dataclasses.replace(plan, screen_trials=n_screen),
            prepared,
            out_dir,
            space=space,
            points=points,
            resume=resume,
            callbacks=callbacks,
            datasets=datasets,
            mode=mode,
            budget_s=limit,
        )
        actual["screening"] = time.perf_counter() - part
        trials = trial_rows(results, plan)
        challenger_params, verdict, gain = pick_challenger(
            trials, user, val_images=_val_images(prepared, base), z=search.guard_z
        )
    # The full-length runs: the user's configuration unless screening replaced it; in a budget of
    # two runs, or without a budget, also the best challenger, and the paired guard picks.
    part = time.perf_counter()
    # Decided once: a resumed search finishes the same full-length runs it started.
    decided = _read_json(out_dir, FINAL_FILE) if resume else None
    observed = observed_epoch_s(results, images=_epoch_images(prepared, base)) if n_screen and not decided else None
    final_epochs = (
        decided["epochs"]
        if decided
        else _final_epochs(plan, started, screened=bool(n_screen), observed_screen_epoch_s=observed)
    )
    if observed and plan.budget_s and plan.costs:
        logger.info(
            f"[search {model}] at the screening runs' training speed an epoch at {plan.screen_image_size} px "
            f"costs {observed:.1f} s, the timed steps predicted {plan.costs['screen_epoch_s']:.1f} s: "
            + ("with its epochs re-costed by that, " if observed > plan.costs["screen_epoch_s"] else "")
            + f"the final run gets {final_epochs} of {plan.epochs}"
        )
    write_json(join(out_dir, FINAL_FILE), {"epochs": final_epochs})
    chosen_params = user
    runs = []
    two_runs = plan.full_runs == 2 and challenger_params is not None
    if plan.full_runs == 1 and challenger_params is not None and verdict.startswith("replaced"):
        chosen_params = challenger_params
    runs.append(
        full_run(
            "incumbent" if chosen_params is user else "challenger",
            trial_config(base, chosen_params, epochs=final_epochs),
            chosen_params,
            prepared,
            out_dir,
        )
    )
    if two_runs:
        runs.append(
            full_run(
                "challenger",
                trial_config(base, challenger_params, epochs=final_epochs),
                challenger_params,
                prepared,
                out_dir,
            )
        )
        incumbent, challenger = runs
        check = guard_paired(
            val_correct(incumbent.state, incumbent.config, prepared),
            val_correct(challenger.state, challenger.config, prepared),
            z=search.guard_z,
        )
        chosen, gain = (challenger if check.replace else incumbent), check.difference
        verdict = (
            "replaced: the challenger's full-length run beat the user's by "
            if check.replace
            else "kept: the challenger's full-length run did not beat the user's by more than the noise: "
        ) + check.describe()
    else:
        chosen = runs[0]
    actual["full_runs"] = time.perf_counter() - part
    kept = chosen.params is user
    logger.info(f"[search {model}] {verdict}")
    return SearchOutcome(
        best_config=chosen.config,
        best_params=chosen.params,
        best_state=chosen.state,
        best_metrics={k: chosen.best[k] for k in ("epoch", "val_acc", "val_loss")},
        kept=kept,
        verdict=verdict,
        gain=gain,
        plan=plan,
        actual_s=actual,
        trials=trials,
        lr_curve=lr_curve,
        full_runs=[
            {
                "label": r.label,
                "params": describe(r.params),
                "epochs": r.config.epochs,
                "best_val_acc": r.best["val_acc"],
                "seconds": r.seconds,
            }
            for r in runs
        ],
        resources={"cpus": compute_parallelism(), "gpus": gpu_parallelism()},
        span=(started_at, time.time()),
    )


def pick_challenger(
    trials: pd.DataFrame, user: dict, *, val_images: int, z: float = GUARD_Z
) -> tuple[dict | None, str, float]:
    """The best completed screening run that is not the user's, and the unpaired guard's verdict
    against the user's own screening run (both at the same low fidelity, ranked by their final,
    annealed val accuracy, never by a mid-schedule maximum)."""
    completed = trials[trials["status"] == "completed"] if len(trials) else trials
    is_user = (
        completed.apply(lambda row: all(row.get(k) == v for k, v in user.items()), axis=1) if len(completed) else []
    )
    incumbent, others = (
        completed[is_user] if len(completed) else completed,
        completed[~is_user] if len(completed) else completed,
    )
    if not len(others):
        return None, "kept: no challenger completed its screening run", math.nan
    best = others.loc[others["val_acc"].idxmax()]
    # Plain Python values: numpy scalars would reach the checkpoints' history, which torch's safe
    # loading (weights_only) refuses.
    params = {k: best[k].item() if hasattr(best[k], "item") else best[k] for k in user if k in best}
    if not len(incumbent):
        return params, "replaced: the user's screening run did not complete (failed or diverged)", math.nan
    check = guard_unpaired(float(incumbent["val_acc"].iloc[0]), float(best["val_acc"]), val_images, z=z)
    word = "replaced" if check.replace else "kept"
    return (
        params,
        f"{word}: at screening fidelity the best challenger ({best['params']}) scored " + check.describe(),
        check.difference,
    )


def _epoch_images(prepared: PreparedData, base: TrainConfig) -> float:
    """An epoch's cost in training images: a validation pass costs about a third of a training pass
    over the same images."""
    counts = prepared.manifest["splits"]
    train = counts["train"]["count"] * (1 if "val" in counts else 1 - base.val_fraction)
    return train + _val_images(prepared, base) / 3


def _val_images(prepared: PreparedData, base: TrainConfig) -> int:
    counts = prepared.manifest["splits"]
    return int(counts["val"]["count"] if "val" in counts else counts["train"]["count"] * base.val_fraction)


def _final_epochs(plan: Plan, started: float, *, screened: bool, observed_screen_epoch_s: float | None) -> int:
    """The final run's length (policy.final_run_epochs): what is left of the budget at the epoch cost
    the screening runs showed, up to the epochs asked for, and never below what the plan reserved
    for it (less when a duel the plan did not count took its share). Without a budget, the epochs
    asked for."""
    if not plan.budget_s:
        return plan.final_epochs
    reserved = plan.duel_final_epochs if screened and not plan.screen_trials else plan.final_epochs
    # A plan saved before it recorded its costs: the per-epoch share of its full runs, no overhead.
    share = plan.planned_s["full_runs"] / plan.full_runs / max(plan.final_epochs, 1)
    costs = Costs(**plan.costs) if plan.costs else Costs(share, 0.0, 0.0, 0.0)
    return final_run_epochs(
        plan,
        calibrated(costs, observed_screen_epoch_s),
        left_s=plan.budget_s - (time.perf_counter() - started),
        reserved_s=full_run_s(costs, reserved),
    )


def observed_epoch_s(results: list, *, images: float) -> float | None:
    """What a screening epoch of `images` (the training images plus a third of the validation
    images, as the probe counts them) costs at the training throughput the screening runs showed:
    their median images/s over the training passes after each run's first (which also warms up),
    or over every pass when none ran a second. None when no epoch ran."""
    frames = [r.metrics_dataframe for r in results if r.metrics_dataframe is not None]
    rows = pd.concat([f for f in frames if {"epoch", "train_images_per_s"} <= set(f.columns)] or [pd.DataFrame()])
    if not len(rows):
        return None
    later = rows[rows["epoch"] >= 2]
    speed = float(np.median((later if len(later) else rows)["train_images_per_s"]))
    return images / speed if speed > 0 else None


def _read_json(folder: str, name: str) -> dict | None:
    return json.loads(read_text(join(folder, name))) if is_file(join(folder, name)) else None


def write_json(location: str, payload: Any) -> None:
    write_bytes(location, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def describe_params(params: dict) -> str:
    return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in params.items()}, sort_keys=True)
