"""Run one training job on Ray Train, then evaluate its best checkpoint once on the held-out split.

Model selection uses validation accuracy only; the test split is read once, after training, by
a Ray task placed like a training worker (on a GPU when the run used GPUs). The original notebook
picked its best epoch by *test* accuracy, which leaks the test set into model selection.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from torch import nn

from gendertune.base.config import ConfigError
from gendertune.base.errors import GendertuneError, MissingInputError, StageFailed, UserInputError
from gendertune.base.plots import plot_accuracy_per_epoch, plot_confusion_matrix, plot_loss_per_epoch, plot_mistakes
from gendertune.cluster import tracking
from gendertune.cluster.ddp import torch_config
from gendertune.cluster.environment import write_environment
from gendertune.cluster.runtime import compute_parallelism, ensure_ray, require_resources, run_on_other_nodes
from gendertune.cluster.shared_storage import require_shared
from gendertune.cluster.storage import (
    OutputLocation,
    claim_folder,
    output_location,
    write_json_atomic,
    write_text_atomic,
)
from gendertune.data_prep.layout import PreparedData, open_prepared, read_slices
from gendertune.models.registry import build_model, check_image_size, count_parameters, get_spec
from gendertune.models.transforms import EvalPreprocess
from gendertune.models.weights import fetch_hub_weights
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.calibration import calibrated_probability, fit_temperature
from gendertune.tuning.evaluate.decision import fit_threshold, with_tta
from gendertune.tuning.evaluate.eval_sets import evaluate_run, load_eval_set
from gendertune.tuning.evaluate.metrics import evaluate_predictions, most_confident_mistakes
from gendertune.tuning.evaluate.slices import slices_of
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.data import (
    ordered_ingest,
    read_split_images,
    test_dataset,
    training_datasets,
    training_views,
)
from gendertune.tuning.train.engine import NonFiniteLoss, evaluate, select_precision
from gendertune.tuning.train.worker import load_state_dir, train_worker

logger = logging.getLogger(__name__)


class RunAlreadyComplete(GendertuneError, FileExistsError):
    """--out holds a finished run; nothing to resume."""


class RunFailed(StageFailed):
    """Training failed more often than max_failures allows; its checkpoints stay for a resume."""


def check_compatible(config: TrainConfig, prepared: PreparedData) -> int:
    """Validate model vs data before any Ray work; returns the training image size."""
    image_size = config.image_size or prepared.image_size
    try:  # the registry's plain ValueErrors (unknown model, a size it cannot run) are settings to change
        get_spec(config.model)
        check_image_size(config.model, image_size)
    except ValueError as err:
        raise ConfigError(f"train: {err}") from None
    if config.weights and not Path(config.weights).is_file():
        raise MissingInputError(f"--weights {config.weights} does not exist")
    if config.pretrained:
        fetch_hub_weights(get_spec(config.model))
    return image_size


def scaling_config(config: TrainConfig) -> ray.train.ScalingConfig:
    resources = {"CPU": config.cpus_per_worker}
    if config.gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(
        num_workers=config.workers,
        use_gpu=config.gpu,
        resources_per_worker=resources,
        placement_strategy=config.placement_strategy,
    )


def loop_settings(config: TrainConfig, prepared: PreparedData) -> dict:
    """What the epoch loop needs besides the config: image size, steps per epoch, torch threads."""
    image_size = check_compatible(config, prepared)
    train_rows = prepared.manifest["splits"]["train"]["count"]
    if "val" not in prepared.splits:
        train_rows = int(train_rows * (1 - config.val_fraction))
    return {
        "image_size": image_size,
        # For the per-step lr schedule; the streaming shards don't know their length up front.
        "steps_per_epoch": max(1, train_rows // (config.batch_size * config.workers)),
        "threads_per_worker": max(1, compute_parallelism() // config.workers),
    }


def build_trainer(
    config: TrainConfig,
    prepared: PreparedData,
    *,
    storage_path: str,
    name: str,
    callbacks=None,
    datasets=None,
    run_started_at: float | None = None,
) -> TorchTrainer:
    """The TorchTrainer for one run; multi-worker Tune trials build theirs with this too, passing
    the `datasets` their search built once and when the trial started (`run_started_at`, the
    epoch rows' column; default: now, as the trainer is built)."""
    # One bar per split per epoch, from the split coordinators: the epoch lines say the same.
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_started_at = time.time() if run_started_at is None else run_started_at
    return TorchTrainer(
        train_worker,
        train_loop_config={"train": config, **loop_settings(config, prepared), "run_started_at": run_started_at},
        scaling_config=scaling_config(config),
        torch_config=torch_config(),  # a local run's DDP store on loopback only
        datasets=datasets or training_datasets(prepared, val_fraction=config.val_fraction),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"], execution_options=ordered_ingest()),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # Ray Train's own INFO lines (each report, each checkpoint) would bury the epoch lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


def fit_interruptibly(trainer: TorchTrainer):
    """trainer.fit() in a helper thread. Called in the main thread, Ray Train installs its own
    SIGINT handler, which swallows Ctrl-C (exit 1, no message); this way Ctrl-C reaches the
    command line as KeyboardInterrupt (exit 130 and the resume hint), and the run's actors end
    with the driver, its checkpoints kept."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the caller's thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # a bounded wait, so a KeyboardInterrupt is delivered here at once
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def non_finite_loss(err: ray.train.TrainingFailedError) -> NonFiniteLoss | None:
    """The NonFiniteLoss a worker raised, if that is why the run failed: resuming would diverge
    again, so the message must say what to change, not "re-run to resume"."""
    for failure in getattr(err, "worker_failures", {}).values():
        while failure is not None:
            if isinstance(failure, NonFiniteLoss):
                return failure
            failure = failure.__cause__
    return None


def best_checkpoint(result) -> tuple[ray.train.Checkpoint, dict]:
    """Highest val_acc; ties go to the lower val_loss (then the earlier epoch)."""
    if not result.best_checkpoints:
        raise RunFailed(f"the run produced no checkpoint (error: {result.error})")
    return max(result.best_checkpoints, key=lambda pair: (pair[1]["val_acc"], -pair[1]["val_loss"], -pair[1]["epoch"]))


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as folder:
        return load_state_dir(folder)


def evaluate_held_out(state: dict, config: TrainConfig, data_root: str, splits: list[str]) -> dict[str, dict]:
    """Ray task body: the best weights on each held-out split in turn; per split its predictions,
    logit margins and timing."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # no bars from inside a task
    prepared = open_prepared(data_root)
    spec = get_spec(config.model)
    device = torch.device("cuda" if config.gpu and torch.cuda.is_available() else "cpu")
    model = build_model(config.model, image_size=state["image_size"])
    model.load_state_dict(state["model"])
    model = with_tta(model.to(device=device, memory_format=torch.channels_last), config.tta)
    preprocess = EvalPreprocess(image_size=state["image_size"], mean=spec.mean, std=spec.std)
    results = {}
    for split in splits:
        # Read once, so no caching: for val, only the val view is computed, not the train split too.
        dataset = (
            test_dataset(prepared)
            if split == "test"
            else training_views(prepared, val_fraction=config.val_fraction)["val"]
        )
        ids: list[str] = []

        def batches():  # consumed within this iteration, so the loop's variables are the current ones
            for batch in dataset.iter_batches(batch_size=config.eval_batch_size, batch_format="numpy"):  # noqa: B023
                ids.extend(batch.get("image_id", [""] * len(batch["label"])))  # noqa: B023
                yield torch.from_numpy(batch["image"].copy()), torch.from_numpy(batch["label"].copy())

        # fp32, like `predict`: the reported numbers must not depend on a precision shortcut.
        result = evaluate(
            model,
            batches(),
            preprocess=preprocess,
            criterion=nn.CrossEntropyLoss(),
            precision=select_precision("fp32", device),
            device=device,
        )
        results[split] = {
            "image_id": ids,
            "label": result.labels.tolist(),
            "prob_positive": result.prob_positive.tolist(),
            "margin": result.margin.tolist(),
            "seconds": result.model_seconds,
            "loss": result.stats.loss,
        }
    return results


def held_out_predictions(state: dict, config: TrainConfig, prepared: PreparedData) -> dict[str, dict]:
    """The best weights on validation (to fit the temperature), then on the held-out split, in one
    Ray task placed like a training worker; {"val": ..., "test": ...} (only "val" without a test
    split). One task, not one per split: two at once would each hold a worker's CPUs, and on a
    small cluster leave none for the Ray Data reads they both wait on."""
    task = ray.remote(evaluate_held_out).options(num_cpus=config.cpus_per_worker, num_gpus=1 if config.gpu else 0)
    splits = ["val", "test"] if "test" in prepared.splits else ["val"]
    return ray.get(task.remote(state, config, prepared.root, splits))


def evaluate_held_out_and_write(
    out: Path, config: TrainConfig, prepared: PreparedData, state: dict, best: dict, *, started: float
) -> dict:
    """The one held-out evaluation of a run's chosen weights, used by train and by compare (which
    keeps its search's best trial): predictions on the held-out splits, then every file of the
    finished run, metrics.json last. Returns the metrics; `started` is when the run began."""
    held_out = held_out_predictions(state, config, prepared)
    return write_run_outputs(out, config, prepared, state, best, held_out, time.perf_counter() - started)


def save_atomic(payload: dict, path: Path) -> None:
    """torch.save through a temporary sibling and a rename: a killed run never leaves half a model.pt."""
    partial = path.with_name(f".{path.name}.partial")
    torch.save(payload, partial)
    partial.replace(path)


def write_run_outputs(
    out: Path,
    config: TrainConfig,
    prepared: PreparedData,
    state: dict,
    best: dict,
    held_out: dict[str, dict],
    wall_seconds: float,
) -> dict:
    """Everything a finished run holds (gendertune.tuning.evaluate.run_layout), metrics.json last. `held_out` is
    held_out_predictions' result: the temperature is fitted on "val", the report is on "test"
    (or on "val", with a warning, when the prep made no test split)."""
    spec = get_spec(config.model)
    split = "test" if "test" in held_out else "val"
    temperature = fit_temperature(np.asarray(held_out["val"]["label"]), np.asarray(held_out["val"]["margin"]))
    threshold = fit_threshold(
        held_out["val"]["label"], calibrated_probability(held_out["val"]["margin"], temperature), config.threshold
    )
    history = pd.DataFrame(state["history"])
    write_text_atomic(out / run_layout.HISTORY, history.to_csv(index=False))
    save_atomic(
        {
            "format_version": run_layout.MODEL_FORMAT_VERSION,
            "model": state["model"],
            "model_name": config.model,
            "image_size": state["image_size"],
            "prep_image_size": prepared.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "class_names": prepared.class_names,
            "epoch": best["epoch"],
            "val_acc": best["val_acc"],
            # How prep framed the faces (gendertune.data_prep.faces.AlignSettings): predict reproduces it.
            "alignment": prepared.alignment,
            "temperature": temperature,  # predict reports sigmoid(margin / temperature)
            "tta": config.tta,
            "threshold": threshold,  # predict averages as evaluation did, decides at threshold
        },
        out / run_layout.MODEL,
    )
    scored = held_out[split]
    predictions = pd.DataFrame(
        {
            "image_id": scored["image_id"],
            "label": scored["label"],
            "margin": scored["margin"],
            "prob_uncalibrated": scored["prob_positive"],
            "prob_positive": calibrated_probability(scored["margin"], temperature),
        }
    )
    write_text_atomic(out / run_layout.PREDICTIONS, predictions.to_csv(index=False))
    evaluation = evaluate_predictions(
        predictions["label"],
        predictions["prob_positive"],
        class_names=tuple(prepared.class_names),
        prob_uncalibrated=predictions["prob_uncalibrated"],
        threshold=threshold,
    )
    groups = read_slices(prepared)
    if groups is not None and split == "test":
        evaluation["slices"] = {
            "test": slices_of(
                predictions, groups, key="image_id", class_names=prepared.class_names, threshold=threshold
            )
        }
    mistakes = most_confident_mistakes(predictions, threshold=threshold)
    plot_mistakes(
        mistakes,
        read_split_images(prepared, split, mistakes["image_id"].tolist()),
        out / f"mistakes_{split}.png",
        class_names=prepared.class_names,
        title=f"{config.model}: most confident mistakes on {split}",
    )
    plot_accuracy_per_epoch(history, out / "accuracy_per_epoch.png")
    plot_loss_per_epoch(history, out / "loss_per_epoch.png")
    plot_confusion_matrix(
        evaluation["confusion_matrix"],
        out / "confusion_matrix.png",
        class_names=tuple(prepared.class_names),
        title=f"{config.model} on {split}",
    )
    metrics = {
        "model": config.model,
        "evaluated_on": split,
        **evaluation,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "epochs_run": len(history),
        "params": count_parameters(build_model(config.model, image_size=state["image_size"])),
        "image_size": state["image_size"],
        "wall_seconds": wall_seconds,
        "train_images_per_s": float(history["train_images_per_s"].mean()),
        "temperature": temperature,
        "tta": config.tta,
        "threshold": threshold,
        "inference_images_per_s": len(predictions) / max(scored["seconds"], 1e-9),
        "workers": config.workers,
        "gpu": config.gpu,
        # Which precision --precision resolved to on the workers, and why (gendertune.tuning.train.engine.select_precision).
        **{key: history[key].iloc[-1] for key in ("precision", "precision_reason") if key in history},
    }
    if split != "test":
        metrics["warning"] = (
            "the prepared data has no test split: these numbers are on the validation split that "
            "also selected the best epoch, so they are optimistic"
        )
    write_json_atomic(out / run_layout.METRICS, metrics)
    return metrics


def fit_best(config: TrainConfig, prepared: PreparedData, *, storage_path: str) -> tuple[dict, dict]:
    """Train (or resume) one run with Ray Train in `storage_path`; its best-by-validation state,
    with the whole history, and that epoch's metrics. `train` and the search's full-length runs both
    train through this, so a search that keeps the user's configuration reproduces `train` exactly."""
    trainer = build_trainer(config, prepared, storage_path=storage_path, name=run_layout.RAY_RUN_NAME)
    try:
        result = fit_interruptibly(trainer)
    except ray.train.TrainingFailedError as err:
        if (diverged := non_finite_loss(err)) is not None:
            raise RunFailed(f"training stopped: {diverged}") from err
        raise RunFailed(
            f"training failed ({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}); "
            f"the checkpoints are kept in {storage_path}: re-run the same command to resume from the latest one"
        ) from err
    checkpoint, best = best_checkpoint(result)
    latest_state = load_checkpoint_state(result.checkpoint)
    best_state = load_checkpoint_state(checkpoint)
    best_state["history"] = latest_state["history"]
    return best_state, best


def val_correct(state: dict, config: TrainConfig, prepared: PreparedData) -> np.ndarray:
    """Per validation image, whether `state` classifies it right (the search's paired guard), in
    one Ray task placed like a training worker."""
    task = ray.remote(evaluate_held_out).options(num_cpus=config.cpus_per_worker, num_gpus=1 if config.gpu else 0)
    val = ray.get(task.remote(state, config, prepared.root, ["val"]))["val"]
    return (np.asarray(val["prob_positive"]) >= 0.5) == np.asarray(val["label"], dtype=bool)


def run_training(config: TrainConfig, *, tracking_uri: str | None = None) -> dict:
    """Train (or resume) the run in config.out (a folder or a URI), evaluate it on the test split
    and on every eval set, and log it to MLflow when `tracking_uri` is given; returns metrics.json's content."""
    prepared = open_prepared(config.data)
    eval_sets = [load_eval_set(spec, attribute=prepared.manifest["attribute"]) for spec in config.eval_sets]
    if tracking_uri:
        tracking.ensure_experiment(tracking_uri, tracking.TRAIN_EXPERIMENT)  # an unreachable server fails now
    with output_location(
        config.out, stage="train", markers=(run_layout.METRICS,), ray_dirs=frozenset({run_layout.RAY_RUN_NAME})
    ) as location:
        train_into(location, config)
        for eval_set in eval_sets:
            scores = evaluate_run(location.local, eval_set)
            low, high = scores["accuracy_ci95"]
            logger.info(
                f"{config.model}: {eval_set.name} accuracy {scores['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f})"
            )
        metrics = run_layout.read_metrics(location.local)
        if tracking_uri:
            run = location.local
            tracking.log_model_result(
                tracking_uri,
                tracking.TRAIN_EXPERIMENT,
                config.model,
                config.to_dict(),
                metrics,
                tracking.run_artifacts(run),
                history=pd.read_csv(run / run_layout.HISTORY),
                tags={"gendertune.out": location.storage},
            )
        return metrics


def _read_saved_config(path: Path, run: str) -> dict:
    """The saved run's train settings, those it lacks at their defaults (TrainConfig.with_new_defaults)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserInputError(
            f"{run} holds an unfinished run whose {run_layout.CONFIG} is not valid JSON ({err}); choose another --out"
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        raise UserInputError(
            f"{run} holds an unfinished run whose {run_layout.CONFIG} has no train settings; choose another --out"
        )
    return TrainConfig.with_new_defaults(saved["train"])


def train_into(location: OutputLocation, config: TrainConfig) -> dict:
    """run_training with the output already resolved: the driver's files go to location.local,
    Ray Train's checkpoints to location.storage (compare's retrain calls this for a model folder)."""
    started = time.perf_counter()
    prepared = open_prepared(config.data)
    check_compatible(config, prepared)
    out = location.local
    if run_layout.is_complete(out):
        raise RunAlreadyComplete(
            f"{location.storage} already holds a finished run ({run_layout.METRICS}); choose another --out"
        )
    saved = out / run_layout.CONFIG
    if saved.is_file() and _read_saved_config(saved, location.storage) != json.loads(config.to_json())["train"]:
        raise UserInputError(
            f"{location.storage} holds an unfinished run with a different config; resume it with the same flags or choose another --out"
        )
    ensure_ray()
    require_resources(workers=config.workers, cpus_per_worker=config.cpus_per_worker, gpus_per_worker=int(config.gpu))
    if config.pretrained:  # the driver fetched them for its node in check_compatible
        run_on_other_nodes(fetch_hub_weights, get_spec(config.model))
    require_shared(reads=[prepared.root, config.weights], writes=[location.storage])
    claim_folder(out, "train")
    write_text_atomic(saved, config.to_json())
    write_environment(out)
    best_state, best = fit_best(config, prepared, storage_path=location.storage)
    split = "test" if "test" in prepared.splits else "val"
    logger.info(f"best epoch {best['epoch']} (val acc {best['val_acc']:.4f}); evaluating once on the {split} split")
    metrics = evaluate_held_out_and_write(out, config, prepared, best_state, best, started=started)
    low, high = metrics["accuracy_ci95"]
    logger.info(
        f"{config.model}: {split} accuracy {metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
        f"macro F1 {metrics['macro_f1']:.4f}, majority rate {metrics['majority_rate']:.4f}; wrote {location.storage}"
    )
    return metrics
