"""The learning-rate range test (Smith 2017; fastai's `lr_find`), Ray-free: a few hundred steps
with the lr growing exponentially, the loss recorded at each, and the lr to use read off the curve.

The search runs it first, at screening fidelity, because the lr matters most and costs least to
screen: a user's lr that is 50x off (`--lr 2e-5`) is found in a few percent of one run's time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from gendertune.models.registry import classification_loss
from gendertune.tuning.train.engine import Batch

# Stop when the smoothed loss exceeds this multiple of its minimum: the lr has diverged.
DIVERGED = 4.0
# The smoothing of the recorded loss (an exponential moving average, bias-corrected, as fastai does).
BETA = 0.9
# A curve whose smoothed loss never got this far below the loss of guessing (ln 2 for two
# classes), or whose lowest point lies in its first quarter (where the lr is still too small to
# move anything), found no lr that learns (too few steps, or too little data): it suggests
# nothing rather than noise.
DESCENT = 0.95
CHANCE_LOSS = math.log(2)


@dataclasses.dataclass(frozen=True)
class LrCurve:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float | None  # None: the curve never showed the loss falling

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def suggest_lr(lrs: list[float], losses: list[float]) -> float | None:
    """A tenth of the lr at the smoothed loss's minimum (fastai's "minimum/10"): the largest lr
    still well inside the region where the loss falls. Steps after divergence are not on the curve.
    None when the loss never really fell: the test saw no lr that learns."""
    if not lrs:
        raise ValueError("suggest_lr: an empty curve")
    lowest = int(np.argmin(losses))
    if losses[lowest] > DESCENT * CHANCE_LOSS or lowest < len(losses) // 4:
        return None
    return float(lrs[lowest]) / 10


def lr_range_test(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    optimizer: torch.optim.Optimizer,
    augment: Callable[[Tensor], Tensor],
    criterion: nn.Module,
    aux_weight: float,
    device: torch.device,
    steps: int,
    lr_min: float = 1e-6,
    lr_max: float = 1.0,
) -> LrCurve:
    """Train `steps` steps (cycling `batches` when they run out) with the lr going from `lr_min` to
    `lr_max` geometrically, until the smoothed loss diverges. Changes `model` and `optimizer`:
    give it copies made for the test."""
    growth = (lr_max / lr_min) ** (1 / max(steps - 1, 1))
    data = list(batches)
    if not data:
        raise ValueError("lr_range_test: no training batches")
    model.train()
    lrs, losses, average, best = [], [], 0.0, math.inf
    for step in range(steps):
        lr = lr_min * growth**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = data[step % len(data)]
        loss = classification_loss(model(augment(images.to(device))), labels.to(device).long(), criterion, aux_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        average = BETA * average + (1 - BETA) * value
        smoothed = average / (1 - BETA ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if step > 10 and smoothed > DIVERGED * best:
            break
    return LrCurve(lrs=lrs, losses=losses, suggestion=suggest_lr(lrs, losses))
