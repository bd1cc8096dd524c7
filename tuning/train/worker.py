"""The epoch loop of one training run, and the thin per-worker adapters that drive it.

`epoch_results` is written once against a small `TrainSession` interface (rank, restore, data)
and yields each epoch's metrics and checkpoint state. `run_epochs` reports them through the
session: `train_worker` adapts that to Ray Train (a TorchTrainer worker: DDP, sharded data,
rank 0 writes checkpoints). `gendertune.tuning.search.run.InProcessTrial` steps the same generator inside a
single-process Tune trial, which skips the worker-group start-up a TorchTrainer costs per trial
(bench/README.md has the numbers). Both restore from the latest checkpoint after a failure, and both report once per epoch.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn

from gendertune.models.registry import build_model, get_spec
from gendertune.models.transforms import EvalPreprocess, Mixup, TrainAugment
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.engine import build_optimizer, build_scheduler, evaluate, select_precision, train_one_epoch

CHECKPOINT_FILE = "state.pt"
# What each epoch row says about time, besides its metrics: `*_at` columns are wall-clock Unix
# seconds (time.time(), on rank 0; one clock across the processes of one machine), so a run's
# start-up can be read off its own rows. See epoch_results.
TIMING_COLUMNS = ("run_started_at", "loop_started_at", "epoch_started_at", "first_step_at", "train_seconds")
# Ray Train tees a worker's print() to stdout *and* to its root logger, so every printed line
# reached the console twice; a logger record is shown once. Ray Train gives each worker's root
# logger a console handler (its stdout, forwarded to the driver); a Tune trial actor has none, so
# the in-process trials' epoch lines stay there (Tune's table is the display).
logger = logging.getLogger(__name__)


class TrainSession(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def restored_state(self) -> dict | None: ...
    def batches(self, split: str, *, batch_size: int, shuffle_seed: int | None) -> Iterator[tuple[Tensor, Tensor]]: ...
    def wrap_model(self, model: nn.Module) -> nn.Module: ...


class ReportingSession(TrainSession, Protocol):
    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels() -> None:
    """Kernels that give the same result every time (cuDNN without autotuning, cuBLAS with a fixed
    workspace); an op that has none raises instead of silently varying."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS initialises
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def torch_batches(dataset, *, batch_size: int, shuffle_seed: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 images, int64 labels) from a Ray Dataset or shard; training batches drop the ragged
    last batch (BatchNorm cannot train on a batch of one) and shuffle locally with a seed."""
    training = shuffle_seed is not None
    for batch in dataset.iter_torch_batches(
        batch_size=batch_size,
        drop_last=training,
        local_shuffle_buffer_size=batch_size * 8 if training else None,
        local_shuffle_seed=shuffle_seed,
        dtypes={"image": torch.uint8, "label": torch.int64},
    ):
        yield batch["image"], batch["label"]


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _gather_generator_states(generator: torch.Generator, world_size: int) -> list[Tensor]:
    if world_size == 1:
        return [generator.get_state()]
    states = [None] * world_size
    dist.all_gather_object(states, generator.get_state())
    return states


def epoch_results(
    config: TrainConfig,
    *,
    image_size: int,
    steps_per_epoch: int,
    session: TrainSession,
    run_started_at: float | None = None,
) -> Iterator[tuple[dict, dict | None]]:
    """Build, restore, then train every remaining epoch of one run, yielding (metrics row,
    checkpoint state) per epoch; the state is None on ranks other than 0. Nothing runs, and
    nothing is restored, before the first next().

    Besides the metrics, each row carries TIMING_COLUMNS: `run_started_at` (when the run was
    started, before its data and processes were set up: given by the caller, else the loop's
    start), `loop_started_at` (when this loop began in this process, i.e. this attempt: a
    restarted run has a later one), `epoch_started_at` (when the epoch's training pass began; for
    the first epoch, after the model was built and restored), `first_step_at` (when its first
    batch's optimizer step was done; NaN without a batch) and `train_seconds` (its training pass,
    data waits included)."""
    loop_started_at = time.time()
    run_started_at = loop_started_at if run_started_at is None else run_started_at
    rank, device = session.rank, session.device
    seed_everything(config.seed * 1000 + rank)
    if config.deterministic:
        use_deterministic_kernels()
    spec = get_spec(config.model)
    precision = select_precision(config.precision, device)
    model = build_model(config.model, image_size=image_size, pretrained=config.pretrained, weights_path=config.weights)
    model = session.wrap_model(model.to(device=device, memory_format=torch.channels_last))
    unwrapped = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    augment = TrainAugment(image_size=image_size, mean=spec.mean, std=spec.std, **config.augment_strengths())
    preprocess = EvalPreprocess(image_size=image_size, mean=spec.mean, std=spec.std)
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    mixup = Mixup(config.mixup) if config.mixup else None

    start_epoch, history = 0, []
    state = session.restored_state()
    if state is not None:
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if rank < len(state["generator"]):
            generator.set_state(state["generator"][rank])
        start_epoch, history = state["epoch"], state["history"]
        if rank == 0:
            logger.info(f"[gendertune] resuming {config.model} from the checkpoint of epoch {start_epoch}")

    for epoch in range(start_epoch, config.epochs):
        train = train_one_epoch(
            model,
            session.batches("train", batch_size=config.batch_size, shuffle_seed=config.seed * 1000 + epoch),
            optimizer=optimizer,
            scheduler=scheduler,
            augment=lambda images: augment(images, generator=generator),
            mix=None if mixup is None else (lambda images, labels: mixup(images, labels, generator=generator)),
            criterion=criterion,
            aux_weight=spec.aux_loss_weight,
            precision=precision,
            scaler=scaler,
            grad_clip=config.grad_clip,
            device=device,
        )
        val = evaluate(
            model,
            session.batches("val", batch_size=config.eval_batch_size, shuffle_seed=None),
            preprocess=preprocess,
            criterion=criterion,
            precision=precision,
            device=device,
        ).stats
        sums = _all_reduce_sums(
            [train.loss_sum, train.correct, train.count, val.loss_sum, val.correct, val.count, train.seconds], device
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(sums[2], 1),
            "train_acc": sums[1] / max(sums[2], 1),
            "val_loss": sums[3] / max(sums[5], 1),
            "val_acc": sums[4] / max(sums[5], 1),
            "lr": optimizer.param_groups[0]["lr"],
            # Aggregate throughput: all workers' images over the mean worker time.
            "train_images_per_s": sums[2] / max(sums[6] / session.world_size, 1e-9),
            "attempt_start_epoch": start_epoch,
            "precision": precision.name,
            "precision_reason": precision.reason,
            "run_started_at": run_started_at,
            "loop_started_at": loop_started_at,
            "epoch_started_at": train.started_at,
            "first_step_at": train.first_step_at,
            "train_seconds": sums[6] / session.world_size,
        }
        history.append(row)
        if rank == 0:  # one line per epoch, not one per worker
            logger.info(
                f"[gendertune] {config.model} epoch {epoch + 1}/{config.epochs}  "
                f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}  "
                f"lr {row['lr']:.2e}  {row['train_images_per_s']:.0f} img/s"
            )
        generators = _gather_generator_states(generator, session.world_size)
        if rank != 0:
            yield row, None
            continue
        yield (
            row,
            {
                "model": unwrapped.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else {},
                "generator": generators,
                "epoch": epoch + 1,
                "history": list(history),
                "model_name": config.model,
                "image_size": image_size,
            },
        )


def save_state_dir(state: dict, folder: str | Path) -> None:
    torch.save(state, Path(folder) / CHECKPOINT_FILE)


def load_state_dir(folder: str | Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device, weights_only=True)


def run_epochs(
    config: TrainConfig,
    *,
    image_size: int,
    steps_per_epoch: int,
    session: ReportingSession,
    run_started_at: float | None = None,
) -> None:
    """Every remaining epoch of one run, each reported (rank 0 with its checkpoint) to the session."""
    for row, state in epoch_results(
        config, image_size=image_size, steps_per_epoch=steps_per_epoch, session=session, run_started_at=run_started_at
    ):
        if state is None:
            session.report(row, None)
            continue
        with tempfile.TemporaryDirectory() as folder:
            save_state_dir(state, folder)
            session.report(row, folder)


class RayTrainSession:
    """TrainSession for a TorchTrainer worker: DDP, per-worker data shards, Ray Train reports."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def restored_state(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_state_dir(folder, self.device)

    def batches(self, split, *, batch_size, shuffle_seed):
        return torch_batches(ray.train.get_dataset_shard(split), batch_size=batch_size, shuffle_seed=shuffle_seed)

    def report(self, metrics, checkpoint_dir):
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # The node shows where the run actually trained (several nodes: which one failed, or spread).
        ray.train.report({**metrics, "node_id": ray.get_runtime_context().get_node_id()}, checkpoint=checkpoint)

    def wrap_model(self, model):
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})


def quiet_report_lines() -> None:
    """Ray Train logs every report ("Reporting training result N: TrainingReport(...)") at INFO on
    a logger named after its module's *file*, which RunConfig's LoggingConfig (the "ray.train"
    loggers) never reaches; the epoch lines already say what it would."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(loop_config: dict) -> None:
    """TorchTrainer's per-worker function."""
    quiet_report_lines()
    torch.set_num_threads(loop_config["threads_per_worker"])
    run_epochs(
        loop_config["train"],
        image_size=loop_config["image_size"],
        steps_per_epoch=loop_config["steps_per_epoch"],
        session=RayTrainSession(),
        run_started_at=loop_config["run_started_at"],
    )
