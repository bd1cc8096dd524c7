"""Ray-free training and evaluation steps: optimizer, schedule, precision, one epoch, evaluate.

Ray Train's per-worker function (gendertune.tuning.train.worker) and the benchmarks call exactly these, so the
numbers a benchmark reports are the numbers a real run gets.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gendertune.base.errors import StageFailed, UserInputError
from gendertune.models.registry import classification_loss, split_outputs
from gendertune.tuning.train.config import TrainConfig

Batch = tuple[Tensor, Tensor]  # (uint8 N x H x W x 3 images, int labels)


class NonFiniteLoss(StageFailed):
    """The training loss became NaN or infinite: every later step would only spread it into the
    weights, and a run that finished would be a broken model reported as a result."""


@dataclass(frozen=True)
class Precision:
    """How a step runs: the autocast dtype (None = fp32) and whether fp16 needs a GradScaler;
    `reason` says why it was chosen (the run's history records it)."""

    name: str
    autocast_dtype: torch.dtype | None
    reason: str = ""

    @property
    def needs_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()
    }


def bf16_supported(device: torch.device, flags: set[str] | None = None) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Only AVX-512 BF16 or AMX run bf16 natively. oneDNN's own check (_is_mkldnn_bf16_supported)
    # accepts any AVX-512 BW/VL/DQ CPU, where bf16 is emulated and runs slower than fp32.
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def select_precision(requested: str, device: torch.device, flags: set[str] | None = None) -> Precision:
    """`auto`: bf16 where the hardware does it natively, else fp16+GradScaler on GPU, else fp32."""
    native = bf16_supported(device, flags)
    reason = f"--precision {requested}"
    if requested == "auto":
        if native:
            requested = "bf16"
            reason = "auto: native bf16 (" + ("this GPU" if device.type == "cuda" else "AVX-512 BF16 or AMX") + ")"
        elif device.type == "cuda":
            requested, reason = "fp16", "auto: this GPU has no bf16; fp16 with a GradScaler"
        else:
            requested, reason = (
                "fp32",
                "auto: this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be emulated (slower)",
            )
    if requested == "bf16" and not native:
        raise UserInputError(
            f"--precision bf16 is not supported natively on this {device.type} device; use auto or fp32"
        )
    if requested == "fp16" and device.type != "cuda":
        raise UserInputError("--precision fp16 needs a GPU; on CPU use bf16 (if supported) or fp32")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    return Precision(requested, dtypes[requested], reason)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters: decaying them only hurts (timm/nanoGPT do the same).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    if config.optimizer == "adam":
        # Adam's weight_decay is L2 in the gradient; AdamW decouples it.
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, *, config: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (per-step, so warmup is smooth)."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return config.step_gamma ** (step // (config.step_epochs * steps_per_epoch))
    total = config.epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config=config, steps_per_epoch=steps_per_epoch)
    )


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    steps: int = 0
    seconds: float = 0.0
    # Wall-clock (time.time(), comparable across processes on one machine) for a training pass:
    # when it began, and when its first batch's step was done; NaN before that or for evaluation.
    started_at: float = math.nan
    first_step_at: float = math.nan

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

    @property
    def images_per_s(self) -> float:
        return self.count / max(self.seconds, 1e-9)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    augment: Callable[[Tensor], Tensor],
    criterion: nn.Module,
    aux_weight: float,
    precision: Precision,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
    device: torch.device,
    mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> EpochStats:
    """One pass over `batches`. `mix` (e.g. models.transforms.Mixup) turns an augmented batch and
    its labels into blended images and probability targets; accuracy is still counted against
    each image's own label."""
    model.train()
    stats = EpochStats(started_at=time.time())
    started = time.perf_counter()
    for images, labels in batches:
        inputs = augment(images.to(device, non_blocking=True))
        targets = labels.to(device, non_blocking=True).long()
        loss_targets = targets
        if mix is not None:
            inputs, loss_targets = mix(inputs, targets)
        with precision.autocast(device):
            output = model(inputs)
            loss = classification_loss(output, loss_targets, criterion, aux_weight)
        value = float(loss.detach())  # waits for the device, as the stats line below did anyway
        # GradScaler's fp16 steps skip a non-finite step and lower the scale: that is its job.
        if scaler is None and not math.isfinite(value):
            raise NonFiniteLoss(
                f"the training loss became {value} at step {stats.steps + 1} of the epoch: lower --lr, "
                "set --grad-clip, or check the starting weights; no model was written"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        logits, _ = split_outputs(output)
        stats.loss_sum += value * len(targets)
        stats.steps += 1
        stats.correct += int((logits.argmax(1) == targets).sum())
        stats.count += len(targets)
        if math.isnan(stats.first_step_at):  # float(loss) above waited for the device: the step has run
            stats.first_step_at = time.time()
    stats.seconds = time.perf_counter() - started
    return stats


@dataclass
class EvalResult:
    stats: EpochStats  # seconds = wall time, data loading included
    prob_positive: Tensor  # P(label 1), e.g. P(Male)
    margin: Tensor  # logit_1 - logit_0: what temperature scaling rescales (gendertune.tuning.evaluate.calibration)
    labels: Tensor
    model_seconds: float  # preprocessing + forward only: what "inference img/s" means


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    preprocess: Callable[[Tensor], Tensor],
    criterion: nn.Module,
    precision: Precision,
    device: torch.device,
) -> EvalResult:
    model.eval()
    stats = EpochStats()
    probs, margins, all_labels = [], [], []
    model_seconds = 0.0
    started = time.perf_counter()
    for images, labels in batches:
        targets = labels.to(device).long()
        forward_started = time.perf_counter()
        with precision.autocast(device):
            logits, _ = split_outputs(model(preprocess(images.to(device))))
        logits = logits.float().cpu()  # .cpu() waits for the device, so the timing is real
        model_seconds += time.perf_counter() - forward_started
        targets = targets.cpu()
        stats.loss_sum += float(criterion(logits, targets)) * len(targets)
        stats.correct += int((logits.argmax(1) == targets).sum())
        stats.count += len(targets)
        probs.append(logits.softmax(1)[:, 1])
        margins.append(logits[:, 1] - logits[:, 0])
        all_labels.append(targets)
    stats.seconds = time.perf_counter() - started
    empty = torch.zeros(0)
    return EvalResult(
        stats,
        torch.cat(probs) if probs else empty,
        torch.cat(margins) if margins else empty,
        torch.cat(all_labels) if all_labels else empty.long(),
        model_seconds,
    )
