"""The models stage: architectures (registry), local-only weights, and preprocessing/augmentation.

`gendertune.models.registry` builds torchvision classifiers with fresh heads, `gendertune.models.weights` reads
ImageNet or project weights from local files (and, for --pretrained, downloads a missing ImageNet
file into torch's hub cache first), `gendertune.models.transforms` turns prepared uint8 face crops into
normalised model input.
"""

from __future__ import annotations

from gendertune.models.registry import (
    ModelSpec,
    build_model,
    check_image_size,
    classification_loss,
    count_parameters,
    get_spec,
    list_models,
    split_outputs,
)
from gendertune.models.transforms import EvalPreprocess, FramingShift, TrainAugment
from gendertune.models.weights import WeightsError, WeightsNotFoundError, hub_weights_path, hub_weights_url

__all__ = [
    "EvalPreprocess",
    "FramingShift",
    "ModelSpec",
    "TrainAugment",
    "WeightsError",
    "WeightsNotFoundError",
    "build_model",
    "check_image_size",
    "classification_loss",
    "count_parameters",
    "get_spec",
    "hub_weights_path",
    "hub_weights_url",
    "list_models",
    "split_outputs",
]
