"""TrainConfig: every setting of one training run, validated before Ray starts anything."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gendertune.config import ConfigError, StageConfig
from models.transforms import TrainAugment

AUGMENTATIONS = ("hflip", "rotation", "color_jitter", "random_erasing", "random_resized_crop", "zoom", "translate",
                 "random_border")


@dataclasses.dataclass
class TrainConfig(StageConfig):
    section = "train"

    data: str = ""  # a `gendertune prep` output
    out: str = ""  # the run directory; re-running with the same --out resumes it
    model: str = "resnet50"
    epochs: int = 5
    batch_size: int = 64  # per worker, as in torchvision's references
    lr: float = 1e-3
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.05
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.5
    step_epochs: int = 3  # step schedule: multiply lr by step_gamma every step_epochs
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    image_size: int = 0  # 0 = the prepared image size
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpu: bool = False
    # PACK keeps a run's workers on few nodes (fast allreduce); SPREAD puts them on different
    # nodes, so losing one node costs one worker, not the whole group.
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    pretrained: bool = False
    weights: str | None = None
    # Augmentation strengths (0 = off); see models.transforms.TrainAugment for their meaning.
    # Random resized crops are on by default: robustness to how a face is framed is a goal.
    hflip: float = 0.5
    rotation: float = 10.0
    color_jitter: float = 0.2
    random_erasing: float = 0.1
    random_resized_crop: float = 0.25
    # Framing that alignment leaves open: zoom both ways, shifts, and borders like tight crops have.
    zoom: float = 0.2
    translate: float = 0.05
    random_border: float = 0.3
    val_fraction: float = 0.1  # carved from train (by identity when known) if prep made no val split
    seed: int = 0
    # The same seed gives the same numbers on one machine: deterministic kernels, and a search
    # runs one trial at a time (ASHA and Optuna then see results in one order). Slower.
    deterministic: bool = False
    max_failures: int = 1  # worker failures tolerated; each resumes from the latest checkpoint
    eval_batch_size: int = 256
    # NAME=DIR labelled folders scored after training, never during selection (tuning.eval_sets).
    eval_sets: tuple[str, ...] = ()
    # Chaos testing of failure recovery: the first attempt of the run dies at this epoch (0 = never).
    inject_failure_at_epoch: int = 0

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("train.data: give the prep output with --data DIR")
        if not self.out:
            raise ConfigError("train.out: give the run folder with --out DIR")
        for name in ("epochs", "batch_size", "workers", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 10:
            raise ConfigError(f"train.lr: must be in (0, 10), got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_epochs < 0:
            raise ConfigError("train.weight_decay, grad_clip and warmup_epochs must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"train.val_fraction: must be in (0, 0.5), got {self.val_fraction}")
        if self.image_size and self.image_size < 16:
            raise ConfigError(f"train.image_size: must be >= 16 px (or 0 = prep size), got {self.image_size}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("train.cpus_per_worker: must be > 0")
        if self.pretrained and self.weights:
            raise ConfigError("train: give either --pretrained or --weights FILE, not both")
        if self.placement_strategy not in ("PACK", "SPREAD"):
            raise ConfigError(f"train.placement_strategy: PACK or SPREAD, got {self.placement_strategy!r}")
        if self.max_failures < 0:
            raise ConfigError("train.max_failures: must be >= 0")
        try:  # the augmentation's own checks, so each range is stated once (models.transforms)
            TrainAugment(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **self.augment_strengths())
        except ValueError as err:
            raise ConfigError(f"train.{err}; see --augment in `gendertune train --help`") from None
        names = [spec.partition("=")[0] for spec in self.eval_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"train.eval_sets: {', '.join(names)} names a set twice")

    def augment_strengths(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in AUGMENTATIONS}
