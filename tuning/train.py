"""Run one training job on Ray Train, then evaluate its best checkpoint once on the held-out split.

Model selection uses validation accuracy only; the test split is read once, after training, by
a Ray task placed like a training worker (on a GPU when the run used GPUs). The seed notebook
picked its best epoch by *test* accuracy, which leaks the test set into model selection.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from torch import nn

from cluster.errors import StageFailed
from cluster.object_store import OutputLocation, output_location
from cluster.runtime import compute_parallelism, ensure_ray
from cluster.shared_storage import require_shared
from cluster.storage import write_json_atomic, write_text_atomic
from data_prep.layout import PreparedData, open_prepared
from models.registry import build_model, check_image_size, count_parameters, get_spec
from models.transforms import EvalPreprocess
from tuning import run_layout
from tuning.data import test_dataset, training_datasets, training_views
from tuning.engine import evaluate, select_precision
from tuning.metrics import evaluate_predictions
from tuning.plots import plot_accuracy_per_epoch, plot_confusion_matrix, plot_loss_per_epoch
from tuning.train_config import TrainConfig
from tuning.worker import load_state_dir, train_worker


class RunAlreadyComplete(FileExistsError):
    """--out holds a finished run; nothing to resume."""


class RunFailed(StageFailed):
    """Training failed more often than max_failures allows; its checkpoints stay for a resume."""


def check_compatible(config: TrainConfig, prepared: PreparedData) -> int:
    """Validate model vs data before any Ray work; returns the training image size."""
    get_spec(config.model)  # unknown model -> ValueError listing the known ones
    image_size = config.image_size or prepared.image_size
    check_image_size(config.model, image_size)
    if config.weights and not Path(config.weights).is_file():
        raise FileNotFoundError(f"--weights {config.weights} does not exist")
    return image_size


def scaling_config(config: TrainConfig) -> ray.train.ScalingConfig:
    resources = {"CPU": config.cpus_per_worker}
    if config.gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.gpu, resources_per_worker=resources,
                                   placement_strategy=config.placement_strategy)


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
    config: TrainConfig, prepared: PreparedData, *, storage_path: str, name: str, callbacks=None, datasets=None
) -> TorchTrainer:
    """The TorchTrainer for one run; multi-worker Tune trials build theirs with this too, passing
    the `datasets` their search built once."""
    return TorchTrainer(
        train_worker,
        train_loop_config={"train": config.to_dict(), **loop_settings(config, prepared)},
        scaling_config=scaling_config(config),
        datasets=datasets or training_datasets(prepared, val_fraction=config.val_fraction),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"]),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            callbacks=callbacks,
        ),
    )


def best_checkpoint(result) -> tuple[ray.train.Checkpoint, dict]:
    """Highest val_acc; ties go to the lower val_loss (then the earlier epoch)."""
    if not result.best_checkpoints:
        raise RuntimeError(f"the run produced no checkpoint (error: {result.error})")
    return max(result.best_checkpoints, key=lambda pair: (pair[1]["val_acc"], -pair[1]["val_loss"], -pair[1]["epoch"]))


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as folder:
        return load_state_dir(folder)


def evaluate_held_out(state: dict, config_dict: dict, data_root: str, split: str) -> dict:
    """Ray task body: the best weights on the held-out split; returns predictions and timing."""
    config = TrainConfig.from_dict(config_dict)
    ray.data.DataContext.get_current().enable_progress_bars = False  # no bars from inside a task
    prepared = open_prepared(data_root)
    spec = get_spec(config.model)
    device = torch.device("cuda" if config.gpu and torch.cuda.is_available() else "cpu")
    model = build_model(config.model, image_size=state["image_size"])
    model.load_state_dict(state["model"])
    model = model.to(device=device, memory_format=torch.channels_last)
    preprocess = EvalPreprocess(image_size=state["image_size"], mean=spec.mean, std=spec.std)
    # Read once, so no caching: for val, only the val view is computed, not the train split too.
    dataset = test_dataset(prepared) if split == "test" else training_views(prepared, val_fraction=config.val_fraction)["val"]
    ids: list[str] = []

    def batches():
        for batch in dataset.iter_batches(batch_size=config.eval_batch_size, batch_format="numpy"):
            ids.extend(batch.get("image_id", [""] * len(batch["label"])))
            yield torch.from_numpy(batch["image"].copy()), torch.from_numpy(batch["label"].copy())

    # fp32, like `predict`: the reported numbers must not depend on a precision shortcut.
    result = evaluate(model, batches(), preprocess=preprocess, criterion=nn.CrossEntropyLoss(),
                      precision=select_precision("fp32", device), device=device)
    return {
        "image_id": ids, "label": result.labels.tolist(), "prob_positive": result.prob_positive.tolist(),
        "seconds": result.model_seconds, "loss": result.stats.loss,
    }


def write_run_outputs(
    out: Path, config: TrainConfig, prepared: PreparedData, state: dict, best: dict, held_out: dict,
    split: str, wall_seconds: float,
) -> dict:
    spec = get_spec(config.model)
    history = pd.DataFrame(state["history"])
    write_text_atomic(out / run_layout.HISTORY, history.to_csv(index=False))
    torch.save(
        {
            "model": state["model"], "model_name": config.model, "image_size": state["image_size"],
            "prep_image_size": prepared.image_size, "mean": list(spec.mean), "std": list(spec.std),
            "class_names": prepared.class_names, "epoch": best["epoch"], "val_acc": best["val_acc"],
            # How prep framed the faces (data_prep.faces.AlignSettings): predict reproduces it.
            "alignment": prepared.alignment,
        },
        out / run_layout.MODEL,
    )
    predictions = pd.DataFrame({k: held_out[k] for k in ("image_id", "label", "prob_positive")})
    write_text_atomic(out / run_layout.PREDICTIONS, predictions.to_csv(index=False))
    evaluation = evaluate_predictions(
        predictions["label"].to_numpy(), predictions["prob_positive"].to_numpy(),
        class_names=tuple(prepared.class_names), seed=config.seed,
    )
    plot_accuracy_per_epoch(history, out / "accuracy_per_epoch.png")
    plot_loss_per_epoch(history, out / "loss_per_epoch.png")
    plot_confusion_matrix(evaluation["confusion_matrix"], out / "confusion_matrix.png",
                          class_names=tuple(prepared.class_names), title=f"{config.model} on {split}")
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
        "inference_images_per_s": len(predictions) / max(held_out["seconds"], 1e-9),
        "workers": config.workers,
        "gpu": config.gpu,
    }
    if split != "test":
        metrics["warning"] = (
            "the prepared data has no test split: these numbers are on the validation split that "
            "also selected the best epoch, so they are optimistic"
        )
    write_json_atomic(out / run_layout.METRICS, metrics)
    return metrics


def run_training(config: TrainConfig, *, log=print) -> dict:
    """Train (or resume) the run in config.out (a folder or a URI) and evaluate it; returns metrics.json's content."""
    with output_location(config.out, ray_dirs=frozenset({run_layout.RAY_RUN_NAME})) as location:
        return train_into(location, config, log=log)


def train_into(location: OutputLocation, config: TrainConfig, *, log=print) -> dict:
    """run_training with the output already resolved: the driver's files go to location.local,
    Ray Train's checkpoints to location.storage (compare's retrain calls this for a model folder)."""
    started = time.perf_counter()
    prepared = open_prepared(config.data)
    check_compatible(config, prepared)
    out = location.local
    if run_layout.is_complete(out):
        raise RunAlreadyComplete(f"{location.storage} already holds a finished run ({run_layout.METRICS}); choose another --out")
    saved = out / run_layout.CONFIG
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(config.to_json()):
        raise ValueError(f"{location.storage} holds an unfinished run with a different config; resume it with the same flags or choose another --out")
    ensure_ray()
    require_shared(reads=[prepared.root, config.weights], writes=[location.storage])
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, config.to_json())
    trainer = build_trainer(config, prepared, storage_path=location.storage, name=run_layout.RAY_RUN_NAME)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise RunFailed(
            f"training failed ({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}); "
            f"the checkpoints are kept in {location.storage}: re-run the same command to resume from the latest one"
        ) from err
    checkpoint, best = best_checkpoint(result)
    latest_state = load_checkpoint_state(result.checkpoint)
    best_state = load_checkpoint_state(checkpoint)
    best_state["history"] = latest_state["history"]
    split = "test" if "test" in prepared.splits else "val"
    log(f"best epoch {best['epoch']} (val acc {best['val_acc']:.4f}); evaluating once on the {split} split")
    task = ray.remote(evaluate_held_out).options(num_cpus=config.cpus_per_worker, num_gpus=1 if config.gpu else 0)
    held_out = ray.get(task.remote(best_state, config.to_dict(), prepared.root, split))
    metrics = write_run_outputs(out, config, prepared, best_state, best, held_out, split, time.perf_counter() - started)
    low, high = metrics["accuracy_ci95"]
    log(f"{config.model}: {split} accuracy {metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
        f"macro F1 {metrics['macro_f1']:.4f}, majority rate {metrics['majority_rate']:.4f}; wrote {location.storage}")
    return metrics
