"""CompareConfig: the comparison's settings, validated before Ray starts anything (no Ray here)."""

from __future__ import annotations

import dataclasses

from gendertune.base.config import ConfigError, StageConfig, setting
from gendertune.models.registry import get_spec, list_models

# The original notebook's four architectures; VGG19 as vgg19_bn (its registry note says why).
DEFAULT_MODELS = ("resnet50", "resnet18", "googlenet", "vgg19_bn")


@dataclasses.dataclass
class CompareConfig(StageConfig):
    section = "compare"

    data: str = setting("", help="a `gendertune prep` output folder")
    out: str = setting("", help="comparison folder or object-store URI (s3://, gs://)")
    models: tuple[str, ...] = setting(DEFAULT_MODELS, help="comma-separated models", names=list_models())
    resume: bool = setting(False, help="continue an interrupted comparison in --out")
    models_at_once: int = setting(
        0,
        help="models searched side by side, each with an equal share of the cluster's CPU cores and GPUs; "
        "0 = as many as the cluster holds (a model's share: its run's GPUs, or at least 4 CPU cores), "
        "1 = one after another",
        bounds="[0, inf)",
    )
    ensemble_k: int = setting(
        0,
        help="the ensemble row's members: the top K models; 0 = every model within the leader's 95% CI",
        bounds="[0, inf)",
    )

    def validate(self) -> None:
        if not self.data or not self.out:
            raise ConfigError("compare: give --data PREP_OUT and --out DIR")
        if not self.models:
            raise ConfigError("compare.models: name at least one model")
        for model in self.models:
            get_spec(model)  # ValueError listing the known models
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"compare.models: {', '.join(self.models)} names a model twice")
        if self.ensemble_k < 0 or self.ensemble_k == 1:
            raise ConfigError(
                f"compare.ensemble_k: 0 (the models within the leader's CI) or at least 2, got {self.ensemble_k}"
            )
