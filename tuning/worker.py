"""The per-worker Ray Train function: a thin wrapper around tuning.engine.

It builds the model, restores the latest checkpoint when Ray Train restarts a failed worker group
(or when a run is re-launched with the same --out), runs the epochs, sums metrics over workers,
and reports once per epoch. Rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from models.registry import build_model, get_spec
from models.transforms import EvalPreprocess, TrainAugment
from tuning.engine import build_optimizer, build_scheduler, evaluate, select_precision, train_one_epoch
from tuning.train_config import TrainConfig

CHECKPOINT_FILE = "state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _torch_batches(shard, *, batch_size: int, drop_last: bool, shuffle_seed: int | None):
    for batch in shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        local_shuffle_buffer_size=batch_size * 8 if shuffle_seed is not None else None,
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


def train_worker(loop_config: dict) -> None:
    config = TrainConfig.from_dict(loop_config["train"])
    image_size, steps_per_epoch = loop_config["image_size"], loop_config["steps_per_epoch"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(loop_config["threads_per_worker"])
    seed_everything(config.seed * 1000 + rank)

    spec = get_spec(config.model)
    device = ray.train.torch.get_device()
    precision = select_precision(config.precision, device)
    model = build_model(config.model, image_size=image_size, pretrained=config.pretrained, weights_path=config.weights)
    model = model.to(device=device, memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    augment = TrainAugment(image_size=image_size, mean=spec.mean, std=spec.std, **config.augment_strengths())
    preprocess = EvalPreprocess(image_size=image_size, mean=spec.mean, std=spec.std)
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"][rank] if rank < len(state["generator"]) else generator.get_state())
        start_epoch, history = state["epoch"], state["history"]
        if rank == 0:
            print(f"[gendertune] resuming {config.model} from the checkpoint of epoch {start_epoch}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, config.epochs):
        # Only an attempt that started from scratch fails, so the restarted one can finish.
        if epoch == config.inject_failure_at_epoch > 0 and checkpoint is None and rank == 0:
            raise RuntimeError(f"injected failure at epoch {epoch} (inject_failure_at_epoch)")
        train = train_one_epoch(
            model,
            _torch_batches(train_shard, batch_size=config.batch_size, drop_last=True, shuffle_seed=config.seed + epoch),
            optimizer=optimizer, scheduler=scheduler,
            augment=lambda images: augment(images, generator=generator),
            criterion=criterion, aux_weight=spec.aux_loss_weight, precision=precision,
            scaler=scaler, grad_clip=config.grad_clip, device=device,
        )
        val = evaluate(
            model, _torch_batches(val_shard, batch_size=config.eval_batch_size, drop_last=False, shuffle_seed=None),
            preprocess=preprocess, criterion=criterion, precision=precision, device=device,
        ).stats
        sums = _all_reduce_sums(
            [train.loss_sum, train.correct, train.count, val.loss_sum, val.correct, val.count, train.seconds], device
        )
        world = context.get_world_size()
        row = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(sums[2], 1), "train_acc": sums[1] / max(sums[2], 1),
            "val_loss": sums[3] / max(sums[5], 1), "val_acc": sums[4] / max(sums[5], 1),
            "lr": optimizer.param_groups[0]["lr"],
            # Aggregate throughput: all workers' images over the mean worker time.
            "train_images_per_s": sums[2] / max(sums[6] / world, 1e-9),
            "attempt_start_epoch": start_epoch,
        }
        history.append(row)
        if rank == 0:
            print(
                f"[gendertune] {config.model} epoch {epoch + 1}/{config.epochs}  "
                f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}  "
                f"lr {row['lr']:.2e}  {row['train_images_per_s']:.0f} img/s",
                flush=True,
            )
        generators = [None] * world
        if world > 1:
            dist.all_gather_object(generators, generator.get_state())
        else:
            generators = [generator.get_state()]
        if rank == 0:
            unwrapped = model.module if hasattr(model, "module") else model
            state = {
                "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                "generator": generators, "epoch": epoch + 1, "history": history,
                "model_name": config.model, "image_size": image_size,
            }
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(row)
