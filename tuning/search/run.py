"""Search one architecture's hyperparameters with Ray Tune + Optuna (TPE) and ASHA early stopping.

Each trial is one training run of gendertune.tuning.train.worker's epoch loop and reports val accuracy per epoch;
ASHA stops weak trials at its rungs; the test split is never read here. Two trial modes:
- `train`: the trial launches a TorchTrainer (Ray 2.60's Tune-launches-Train pattern) and holds
  only a sliver of CPU itself, so trial drivers never starve their own workers on a small box;
- `inprocess`: a single-worker trial runs the same epoch loop inside the trial actor, which
  saves the worker-group start-up per trial (bench/README.md), and Tune reuses that actor for the next
  trial, which saves the process start and imports too. `auto` picks it for 1 worker.
An interrupted search resumes from its Tune state (finished trials are not re-run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs
import ray
import ray.data
import ray.train
import torch
from torch import nn
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from gendertune.base.config import ConfigError
from gendertune.base.errors import StageFailed
from gendertune.cluster.storage import is_uri, join, resolve
from gendertune.cluster.runtime import compute_parallelism
from gendertune.data_prep.layout import PreparedData, open_prepared
from gendertune.models.registry import build_model, get_spec
from gendertune.models.transforms import EvalPreprocess
from gendertune.models.weights import fetch_hub_weights
from gendertune.tuning.train.data import training_datasets
from gendertune.tuning.train.engine import build_optimizer, select_precision, train_one_epoch
from gendertune.tuning.search.space import base_point, param_space, space_for, trial_config
from gendertune.tuning.train.run import build_trainer, loop_settings
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.worker import TIMING_COLUMNS, epoch_results, load_state_dir, save_state_dir, torch_batches

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
        self.epochs = epoch_results(self.train_config, image_size=settings["image_size"],
                                    steps_per_epoch=settings["steps_per_epoch"],
                                    session=InProcessSession(self.datasets, device, restored),
                                    run_started_at=self.run_started_at)
        self.latest_state: dict | None = None

    def step(self) -> dict:
        row, self.latest_state = next(self.epochs)
        return {**row, "node_id": ray.get_runtime_context().get_node_id(),
                "done": row["epoch"] >= self.train_config.epochs}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        save_state_dir(self.latest_state, checkpoint_dir)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self._begin(self.params, restored=load_state_dir(checkpoint_dir))

    def reset_config(self, new_config: dict) -> bool:
        self.run_started_at = time.time()
        self._begin(new_config, restored=None)
        return True


def run_trial(params: dict, *, base: TrainConfig, data_root: str, trials_dir: str, datasets: dict) -> None:
    """The Tune trainable of `train` mode: one TorchTrainer run with the sampled parameters."""
    started_at = time.time()
    config = trial_config(base, params)
    prepared = open_prepared(data_root)
    trial_id = tune.get_context().get_trial_id()
    # A stable name (no timestamp): a resumed trial finds its Train run and resumes it too.
    build_trainer(config, prepared, storage_path=trials_dir, name=f"train-{trial_id}",
                  callbacks=[TuneReportCallback()], datasets=datasets, run_started_at=started_at).fit()


class TrialSummary(tune.Callback):
    """One line per finished, pruned or failed trial, to this module's logger."""

    def __init__(self, model: str, max_epochs: int):
        self.model, self.max_epochs = model, max_epochs

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        epochs = result.get("training_iteration", 0)
        status = "finished" if epochs >= self.max_epochs else f"pruned by ASHA after {epochs} epoch(s)"
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        logger.info(f"[search {self.model}] trial {trial.trial_id} {status}: val_acc {result.get(METRIC, float('nan')):.4f} ({params})")

    def on_trial_error(self, iteration, trials, trial, **info):
        logger.warning(f"[search {self.model}] trial {trial.trial_id} failed: see {trial.local_path}")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass
class SearchOutcome:
    best_config: TrainConfig
    best_params: dict
    best_state: dict  # the best checkpoint of the best trial (weights + full history)
    best_metrics: dict
    history: pd.DataFrame  # every epoch the best trial reported
    trials_run: int
    trials_pruned: int
    trials_failed: int
    search_seconds: float  # this call's wall time (a resumed search: the part since the resume)
    best_trial_seconds: float  # the best trial's own training time, as Tune counted it


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


def _best_state(result, storage: str) -> tuple[dict, dict]:
    """The best-val_acc checkpoint of one trial, wherever its mode stored it (`storage` is the
    search's storage path: a folder or a URI)."""
    if result.best_checkpoints:  # in-process trials: Tune keeps the checkpoints
        checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1][METRIC])
        with checkpoint.as_directory() as folder:
            return load_state_dir(folder), metrics
    # TorchTrainer trials: Train stored the checkpoints and reported their paths to Tune. Only the
    # best two survive (CheckpointConfig), so pick the best row among those still on disk.
    fs, _ = resolve(storage)
    frame = result.metrics_dataframe
    frame = frame[frame[CHECKPOINT_PATH_KEY].map(
        lambda p: isinstance(p, str) and fs.get_file_info(p).type == pyarrow.fs.FileType.Directory)]
    row = frame.loc[frame[METRIC].idxmax()]
    with ray.train.Checkpoint(row[CHECKPOINT_PATH_KEY], filesystem=fs).as_directory() as folder:
        return load_state_dir(folder), row.to_dict()


def check_search(model: str, base: TrainConfig, search: SearchConfig) -> None:
    """What would otherwise fail only inside the trials, checked on the driver before Ray starts:
    the space's entries, its constants applied to the base settings, ImageNet weights on disk."""
    space = space_for(model, search.space)
    param_space(model, search.space)  # each entry is a valid domain
    constants = {name: spec for name, spec in space.items() if not isinstance(spec, list)}
    try:
        trial_config(dataclasses.replace(base, model=model), constants)
    except ConfigError as err:
        raise ConfigError(f"search.space constants {constants}: {err}") from None
    if base.deterministic and search.max_concurrent > 1:
        raise ConfigError(f"search.max_concurrent {search.max_concurrent} with train.deterministic: a deterministic "
                          "search runs one trial at a time; drop one of the two")
    if base.pretrained:
        fetch_hub_weights(get_spec(model))


def measure_images_per_s(config: TrainConfig, image_size: int, *, threads: int, steps: int = 3) -> float:
    """Training throughput of `config`'s model, from `steps` timed steps on random images after one
    warm-up step (Ray-free; run it where a trial would run, with the threads a trial gets)."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if config.gpu and torch.cuda.is_available() else "cpu")
    spec = get_spec(config.model)
    model = build_model(config.model, image_size=image_size).to(device=device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (config.batch_size, image_size, image_size, 3), dtype=torch.uint8, generator=generator),
             torch.randint(0, 2, (config.batch_size,), generator=generator))
    step = {"model": model, "optimizer": optimizer, "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
            "augment": EvalPreprocess(image_size=image_size, mean=spec.mean, std=spec.std),
            "criterion": nn.CrossEntropyLoss(), "aux_weight": spec.aux_loss_weight,
            "precision": select_precision(config.precision, device), "scaler": None, "grad_clip": 0.0, "device": device}
    train_one_epoch(batches=[batch], **step)  # warm-up: allocator, kernels, lazy init
    return train_one_epoch(batches=[batch] * steps, **step).images_per_s


def plan_budget(model: str, base: TrainConfig, search: SearchConfig, prepared: PreparedData, *,
                concurrent: int, threads: int) -> None:
    """With --time-budget-s: measure a trial's speed, print what fits, and refuse a budget that
    cannot finish one epoch (in seconds, instead of spending the whole budget to find out)."""
    image_size = loop_settings(base, prepared)["image_size"]
    task = ray.remote(measure_images_per_s).options(num_cpus=base.cpus_per_worker, num_gpus=1 if base.gpu else 0)
    per_trial = ray.get(task.remote(base, image_size, threads=threads)) * base.workers
    counts = prepared.manifest["splits"]
    train = counts["train"]["count"] if "val" in counts else counts["train"]["count"] * (1 - base.val_fraction)
    val = counts["val"]["count"] if "val" in counts else counts["train"]["count"] * base.val_fraction
    epoch_s = (train + val / 3) / per_trial  # a validation pass costs about a third of a training pass
    epochs = int(search.time_budget_s // epoch_s) * concurrent
    logger.info(f"[plan {model}] {per_trial:.1f} img/s per trial ({concurrent} at once): ~{epoch_s:.0f} s per epoch; "
                f"--time-budget-s {search.time_budget_s:g} fits ~{epochs} epochs, ~{epochs / base.epochs:.1f} trials of {base.epochs}")
    if epochs == 0:
        raise StageFailed(f"{model}: one epoch takes ~{epoch_s:.0f} s here (measured {per_trial:.1f} img/s), more than "
                          f"--time-budget-s {search.time_budget_s:g}; give it more time, or fewer images, a smaller "
                          "--image-size or --batch-size, or fewer --max-concurrent trials")


def run_search(model: str, base: TrainConfig, search: SearchConfig, prepared: PreparedData, out_dir: str,
               *, resume: bool, callbacks: list | None = None,
               points_to_evaluate: list[dict] | None = None) -> SearchOutcome:
    """Search `model` and return its best configuration and checkpoint. `out_dir` (a folder or a
    URI) holds the Tune state; `callbacks` are more Tune callbacks (e.g. tracking's MLflow logger;
    a restored search keeps the ones it was started with); `points_to_evaluate` are the
    configurations the searcher tries first, in order (default: the base settings' own point,
    gendertune.tuning.search.space.base_point)."""
    base = dataclasses.replace(base, model=model)
    loop_settings(base, prepared)  # image size vs model, weights file: fail before any trial
    mode = resolve_mode(search, base)
    if not is_uri(out_dir):
        out_dir = str(Path(out_dir).absolute())
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    cpus_per_trial = base.cpus_per_worker if mode == "inprocess" else 0.01
    # Deterministic: one trial at a time, or ASHA's cuts and Optuna's next suggestion would
    # depend on which of the trials running together reported first.
    concurrent = 1 if base.deterministic else (
        search.max_concurrent or max(1, compute_parallelism() // math.ceil(base.cpus_per_worker * base.workers)))
    threads = max(1, compute_parallelism() // concurrent)
    if search.time_budget_s and not (resume and tune.Tuner.can_restore(join(out_dir, SEARCH_DIR))):
        plan_budget(model, base, search, prepared, concurrent=concurrent, threads=threads)
    # Built (and, when small, materialised) once for the whole search, not once per trial.
    # val_fraction is not searched, so every trial trains and validates on the same rows.
    # A Dataset executes with the DataContext it was created with, in whichever process reads it:
    # switched off here, its progress bars stay off in the trials too (Tune's table is the display).
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = training_datasets(prepared, val_fraction=base.val_fraction)
    if mode == "inprocess":
        trainable = tune.with_parameters(InProcessTrial, base=base, data_root=prepared.root,
                                         threads=threads, datasets=datasets)
    else:
        trainable = tune.with_parameters(run_trial, base=base, data_root=prepared.root,
                                         trials_dir=join(out_dir, "trials"), datasets=datasets)
    resources = {"cpu": cpus_per_trial, "gpu": (1 if base.gpu else 0) if mode == "inprocess" else 0}
    trainable = tune.with_resources(trainable, resources)
    path = join(out_dir, SEARCH_DIR)
    if resume and tune.Tuner.can_restore(path):
        logger.info(f"[search {model}] resuming the search in {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(model, search.space),
            # metric/mode go to the searcher and scheduler, not TuneConfig: there Tune ranks the
            # trials itself on return and raises KeyError when an interrupted one has no metric yet.
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(metric=METRIC, mode="max", seed=search.seed,
                                        points_to_evaluate=[base_point(base, model, search.space)]
                                        if points_to_evaluate is None else points_to_evaluate),
                scheduler=ASHAScheduler(metric=METRIC, mode="max", time_attr="training_iteration", max_t=base.epochs,
                                        grace_period=min(search.grace_period, base.epochs),
                                        reduction_factor=search.reduction_factor),
                num_samples=search.trials,
                max_concurrent_trials=concurrent,
                time_budget_s=search.time_budget_s or None,
                reuse_actors=mode == "inprocess",
            ),
            run_config=tune.RunConfig(
                name=SEARCH_DIR, storage_path=out_dir,
                # The best checkpoint is all compare needs; Ray keeps the latest too, for resume.
                # Each one holds weights and optimizer state (VGG19: 143 M parameters, three copies with AdamW).
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order="max",
                    # A class trainable checkpoints when Tune asks; a function trainable when it reports.
                    **({"checkpoint_frequency": 1} if mode == "inprocess" else {}),
                ),
                failure_config=tune.FailureConfig(max_failures=base.max_failures),
                callbacks=[TrialSummary(model, base.epochs), *(callbacks or [])],
            ),
        )
    started = time.perf_counter()
    results, interrupted = _fit_noting_interrupts(tuner)
    search_seconds = time.perf_counter() - started
    missing = search.trials - len(results) if not search.time_budget_s else 0
    if interrupted or missing > 0:
        # Tune returns normally after Ctrl-C, with unfinished trials: that is no result to rank.
        raise SearchInterrupted(
            f"the {model} search was interrupted before all {search.trials} trials finished; "
            "run the same command with --resume to continue it"
        )
    # A trial cut off by time_budget_s before its first epoch ended has results without a metric.
    finished = [r for r in results if r.error is None and r.metrics and METRIC in r.metrics_dataframe]
    if not finished:
        errors = "; ".join(str(r.error).splitlines()[0] for r in results if r.error)[:500]
        if not errors and search.time_budget_s:
            raise RuntimeError(f"no {model} trial finished an epoch within --time-budget-s {search.time_budget_s:g}; "
                               "give it more time, or fewer images, a smaller --image-size or batch size")
        raise RuntimeError(f"every {model} trial failed: {errors or 'no trial reported a metric'}")
    best = max(finished, key=lambda r: r.metrics_dataframe[METRIC].max())
    state, metrics = _best_state(best, out_dir)
    params = {k: v for k, v in best.config.items()}
    history = best.metrics_dataframe[[c for c in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_images_per_s", "attempt_start_epoch",
                                                          "precision", "precision_reason", *TIMING_COLUMNS) if c in best.metrics_dataframe]]
    return SearchOutcome(
        best_config=trial_config(base, params), best_params=params, best_state=state,
        best_metrics={k: metrics[k] for k in ("epoch", "val_acc", "val_loss")},
        history=history.drop_duplicates("epoch", keep="last").reset_index(drop=True),
        trials_run=len(results),
        trials_pruned=sum(1 for r in finished if r.metrics.get("training_iteration", 0) < base.epochs),
        trials_failed=sum(1 for r in results if r.error is not None),
        search_seconds=search_seconds, best_trial_seconds=float(best.metrics.get("time_total_s", float("nan"))),
    )


def describe_params(params: dict) -> str:
    return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in params.items()}, sort_keys=True)
