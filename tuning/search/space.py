"""The hyperparameter search space, in one place, overridable from a config file.

A space maps a parameter to `[kind, ...]`: `["loguniform", low, high]`, `["uniform", low, high]`,
`["choice", [values]]`, or a plain constant. `augment_strength` scales every augmentation's
base strength at once (0 = none, 1 = the run's own settings), which keeps the search
low-dimensional while still letting it trade regularisation against fitting speed.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from gendertune.base.config import ConfigError
from gendertune.tuning.train.config import AUGMENTATIONS, TrainConfig

DEFAULT_SPACE: dict[str, Any] = {
    "lr": ["loguniform", 1e-4, 3e-3],
    "batch_size": ["choice", [16, 32, 64]],
    "optimizer": ["choice", ["adamw", "sgd"]],
    "weight_decay": ["loguniform", 1e-5, 1e-1],
    "label_smoothing": ["uniform", 0.0, 0.15],
    "augment_strength": ["uniform", 0.0, 1.0],
}
# Per-architecture adjustments: VGG's huge fully connected head diverges at Adam-typical rates.
MODEL_SPACE: dict[str, dict[str, Any]] = {
    "vgg19": {"lr": ["loguniform", 1e-5, 1e-3]},
    "vit_b_16": {"lr": ["loguniform", 1e-5, 5e-4]},
}
TRAIN_FIELDS = {f for f in TrainConfig.__dataclass_fields__}
FIXED_PER_SEARCH = {"data", "out", "model", "val_fraction", "workers", "gpu", "epochs"}


def space_for(model: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULT_SPACE < MODEL_SPACE[model] < overrides (the config file's `search.space`)."""
    space = {**DEFAULT_SPACE, **MODEL_SPACE.get(model, {}), **(overrides or {})}
    unknown = sorted(set(space) - TRAIN_FIELDS - {"augment_strength"})
    if unknown:
        raise ConfigError(f"search.space: unknown parameter(s) {', '.join(unknown)}; use train settings or augment_strength")
    # These define what is searched over, or the data every trial shares; they can't vary per trial.
    fixed = sorted(set(space) & FIXED_PER_SEARCH)
    if fixed:
        raise ConfigError(f"search.space: {', '.join(fixed)} cannot be searched; set them as train settings")
    return space


def to_tune_domain(name: str, spec: Any):
    """A space entry -> a Ray Tune domain (OptunaSearch converts those to Optuna distributions)."""
    if not isinstance(spec, list) or not spec or not isinstance(spec[0], str):
        return spec  # a constant
    kind, *args = spec
    try:
        if kind == "loguniform":
            low, high = args
            return tune.loguniform(float(low), float(high))
        if kind == "uniform":
            low, high = args
            return tune.uniform(float(low), float(high))
        if kind == "choice":
            (values,) = args
            return tune.choice(list(values))
    except (ValueError, TypeError):
        pass
    raise ConfigError(
        f"search.space.{name}: {spec!r} is not [\"loguniform\"|\"uniform\", low, high] or [\"choice\", [values]]"
    )


def param_space(model: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return {name: to_tune_domain(name, spec) for name, spec in space_for(model, overrides).items()}


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one trial: the base run settings with the sampled parameters applied.
    `augment_strength` scales the *base* augmentation (so `--augment none` stays none, and
    `rotation=30` is what a strength of 1 means); an augmentation searched on its own takes its
    sampled value."""
    strength = float(params.get("augment_strength", 1.0))
    values = {**base.to_dict(), **{name: getattr(base, name) * strength for name in AUGMENTATIONS}}
    values.update({k: v for k, v in params.items() if k != "augment_strength"})
    return TrainConfig.from_dict(values)


def base_point(base: TrainConfig, model: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The user's own configuration as a point of the space: the search's first trial, so a search
    can only add to what `train` with the same settings would give. A value the space cannot hold
    (outside its range or choices) is left for the searcher to sample."""
    point = {}
    for name, spec in space_for(model, overrides).items():
        value = 1.0 if name == "augment_strength" else getattr(base, name)
        if not isinstance(spec, list) or not spec or not isinstance(spec[0], str):
            continue  # a constant: every trial has it anyway
        kind, *args = spec
        if kind == "choice" and value in args[0] or kind != "choice" and float(args[0]) <= value <= float(args[1]):
            point[name] = value
    return point
