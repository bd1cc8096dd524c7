"""TrainConfig: one training run's settings, validated before Ray starts anything.

No Ray here, so the command line builds its flags from it without importing the stages."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gendertune.base.config import SEED_BOUNDS, ConfigError, StageConfig, setting
from gendertune.models.registry import list_models
from gendertune.models.transforms import AUGMENTATIONS, TrainAugment
from gendertune.tuning.evaluate.decision import DecisionThreshold, TestTimeAugmentation


@dataclasses.dataclass
class TrainConfig(StageConfig):
    section = "train"

    data: str = setting("", help="a `gendertune prep` output folder")
    out: str = setting("", help="run folder or object-store URI (s3://, gs://); the same --out again resumes the run")
    model: str = setting("resnet50", help="architecture", names=list_models())
    epochs: int = setting(5, help="epochs", bounds="[1, inf)")
    batch_size: int = setting(
        64, help="batch size per worker", bounds="[1, inf)"
    )  # per worker, as in torchvision's references
    lr: float = setting(1e-3, help="peak learning rate", bounds="(0, 10)")
    optimizer: Literal["adamw", "adam", "sgd"] = setting(
        "adamw", help="optimizer; sgd = nesterov, with the momentum setting"
    )
    momentum: float = setting(0.9, help="sgd's momentum", flag=False, bounds="[0, 1)")
    weight_decay: float = setting(0.05, help="weight decay, not on biases and norms", bounds="[0, inf)")
    schedule: Literal["cosine", "step", "constant"] = setting("cosine", help="lr schedule after warmup")
    warmup_epochs: float = setting(0.5, help="linear warmup length in epochs", bounds="[0, inf)")
    step_epochs: int = setting(
        3, help="step schedule: multiply lr by step_gamma every step_epochs", flag=False, bounds="[1, inf)"
    )
    step_gamma: float = setting(0.1, help="step schedule: the lr factor at each step", flag=False, bounds="(0, 1]")
    label_smoothing: float = setting(0.0, help="label smoothing", bounds="[0, 1)")
    grad_clip: float = setting(0.0, help="max global gradient norm; 0 = off", bounds="[0, inf)")
    image_size: int = setting(0, help="training image side in px; 0 = the prepared size", bounds="[0, inf)")
    workers: int = setting(1, help="Ray Train workers, DDP", bounds="[1, inf)")
    cpus_per_worker: float = setting(1.0, help="CPUs reserved per worker", bounds="(0, inf)")
    gpu: bool = setting(False, help="one GPU per worker (NCCL)")
    # PACK keeps a run's workers on few nodes (fast allreduce); SPREAD puts them on different
    # nodes, so losing one node costs one worker, not the whole group.
    placement_strategy: Literal["PACK", "SPREAD"] = setting(
        "PACK", help="PACK workers onto few nodes, or SPREAD them over nodes"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto", help="auto = bf16 where native (recent CPUs, Ampere+ GPUs), else fp16+GradScaler on GPU, else fp32"
    )
    pretrained: bool = setting(
        False,
        exclusive="weights",
        help="start from ImageNet weights: the torch hub cache, downloaded into it if missing",
    )
    weights: str | None = setting(
        None, exclusive="weights", help="start from a state dict file (ImageNet or this project's)"
    )
    # Augmentation strengths (0 = off), one per name in gendertune.models.transforms.AUGMENTATIONS (a test
    # checks it); see TrainAugment for their meaning. The command line sets them together with --augment.
    # Random resized crops are on by default: robustness to how a face is framed is a goal.
    hflip: float = setting(0.5, help="probability of a horizontal flip", flag=False)
    rotation: float = setting(10.0, help="maximum rotation in degrees", flag=False)
    color_jitter: float = setting(0.2, help="brightness, contrast and saturation jitter (hue: a quarter)", flag=False)
    random_erasing: float = setting(0.1, help="probability of erasing one rectangle", flag=False)
    random_resized_crop: float = setting(0.25, help="crop area down to 1 - this of the image", flag=False)
    # Not an AUGMENTATIONS strength: it changes the targets, not only the images (models.transforms.Mixup).
    mixup: float = setting(
        0.0, help="mixup: blend image pairs and their labels by Beta(alpha, alpha); 0 = off", bounds="[0, inf)"
    )
    # Framing that alignment leaves open: zoom both ways, shifts, and borders like tight crops have.
    zoom: float = setting(0.2, help="scale the face by up to 1 + this, in and out", flag=False)
    translate: float = setting(0.05, help="shift the face by up to this share of the side", flag=False)
    random_border: float = setting(0.3, help="probability of a random border, as tight crops have", flag=False)
    # Carved from train by identity when identities are known, so no person is on both sides.
    val_fraction: float = setting(
        0.1, help="share of train carved out for validation when prep made no val split", bounds="(0, 0.5)"
    )
    seed: int = setting(0, help="seed of the run; in compare, of the search too", bounds=SEED_BOUNDS)
    # The same seed gives the same numbers on one machine: deterministic kernels, and a search
    # runs one trial at a time (ASHA and Optuna then see results in one order). Slower.
    deterministic: bool = setting(
        False,
        help="the same seed gives the same numbers on one machine: deterministic "
        "kernels, one search trial at a time (slower)",
    )
    # Each failure resumes from the latest checkpoint.
    max_failures: int = setting(1, help="worker failures to recover from", bounds="[0, inf)")
    eval_batch_size: int = setting(256, help="batch size of evaluation", flag=False, bounds="[1, inf)")
    # Both off: flip TTA measured within noise, the balanced threshold worse on UTKFace (docs/results.md,
    # issue 22); model.pt carries both to predict.
    tta: TestTimeAugmentation = setting(
        "none",
        help="test-time augmentation of held-out evaluation, eval sets and predict: "
        "flip = average each face with its mirror image (2x inference)",
    )
    threshold: DecisionThreshold = setting(
        "fixed",
        help="decision threshold on P(class 1): fixed = 0.5; balanced = chosen on validation "
        "to maximise the mean of the two classes' recall",
    )
    # NAME=DIR labelled folders scored after training, never during selection (gendertune.tuning.evaluate.eval_sets).
    eval_sets: tuple[str, ...] = setting(
        (),
        flag="--eval-set",
        repeat=True,
        metavar="NAME=DIR",
        help="after training, also score on this labelled folder (a CSV with an image column, the attribute, "
        "and any group columns such as age or race); repeatable",
    )

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("train.data: give the prep output with --data DIR")
        if not self.out:
            raise ConfigError("train.out: give the run folder with --out DIR")
        if self.image_size and self.image_size < 16:
            raise ConfigError(f"train.image_size: must be >= 16 px (or 0 = prep size), got {self.image_size}")
        if self.pretrained and self.weights:
            raise ConfigError("train: give either --pretrained or --weights FILE, not both")
        if self.placement_strategy not in ("PACK", "SPREAD"):
            raise ConfigError(f"train.placement_strategy: PACK or SPREAD, got {self.placement_strategy!r}")
        try:  # the augmentation's own checks, so each range is stated once (gendertune.models.transforms)
            TrainAugment(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **self.augment_strengths())
        except ValueError as err:
            raise ConfigError(f"train.{err}; see --augment in `gendertune train --help`") from None
        names = [spec.partition("=")[0] for spec in self.eval_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"train.eval_sets: {', '.join(names)} names a set twice")

    def augment_strengths(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in AUGMENTATIONS}
