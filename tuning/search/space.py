"""What the search screens, in one place, overridable from a config file (`[search.space]`).

A space maps a parameter to `["loguniform", low, high]`, `["uniform", low, high]`,
`["choice", [values]]`, a plain constant, or a table of those keyed by optimizer (a conditional
range: SGD with Nesterov momentum needs 10-100x AdamW's lr, so one shared range wastes half the
draws). `augment_strength` scales every augmentation but the flip at once (1 = the run's own
settings), which keeps the space small while letting the search trade regularisation against fit.

The space is handed to Optuna as a define-by-run function (`suggest`), so the ranges can depend on
the optimizer drawn and on the lr range test's suggestion. A user's value outside a range widens
that range instead of being dropped: the user's own configuration is always a point of the space.
"""

from __future__ import annotations

import math
from typing import Any

from gendertune.base.config import ConfigError
from gendertune.tuning.train.config import AUGMENTATIONS, TrainConfig

DEFAULT_SPACE: dict[str, Any] = {
    "optimizer": ["choice", ["adamw", "sgd"]],
    # AdamW's range is re-centred on the lr range test's suggestion when there is one (`centre_lr`).
    "lr": {"adamw": ["loguniform", 3e-4, 3e-3], "adam": ["loguniform", 3e-4, 3e-3], "sgd": ["loguniform", 0.02, 0.3]},
    "weight_decay": {
        "adamw": ["loguniform", 0.01, 0.2],
        "adam": ["loguniform", 1e-6, 1e-4],
        "sgd": ["loguniform", 1e-5, 1e-3],
    },
    "label_smoothing": ["uniform", 0.0, 0.1],
    "augment_strength": ["uniform", 0.5, 1.5],
}
# Per-architecture adjustments: VGG's huge fully connected head diverges at Adam-typical rates.
MODEL_SPACE: dict[str, dict[str, Any]] = {
    "vgg19_bn": {
        "lr": {
            "adamw": ["loguniform", 1e-4, 3e-3],
            "adam": ["loguniform", 1e-4, 3e-3],
            "sgd": ["loguniform", 0.005, 0.1],
        }
    },
    "vgg19": {
        "lr": {
            "adamw": ["loguniform", 1e-5, 1e-3],
            "adam": ["loguniform", 1e-5, 1e-3],
            "sgd": ["loguniform", 1e-3, 0.05],
        }
    },
    "vit_b_16": {
        "lr": {
            "adamw": ["loguniform", 1e-5, 5e-4],
            "adam": ["loguniform", 1e-5, 5e-4],
            "sgd": ["loguniform", 1e-3, 0.05],
        }
    },
}
TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__)
FIXED_PER_SEARCH = {"data", "out", "model", "val_fraction", "workers", "gpu", "epochs", "image_size"}
# Not scaled by augment_strength: a flip's probability has no "stronger" than 0.5.
UNSCALED = ("hflip",)
KINDS = ("loguniform", "uniform", "choice")


def _is_domain(spec: Any) -> bool:
    return isinstance(spec, list) and bool(spec) and isinstance(spec[0], str) and spec[0] in KINDS


def _check_domain(name: str, spec: Any) -> None:
    if isinstance(spec, dict):
        for key, inner in spec.items():
            _check_domain(f"{name}.{key}", inner)
        return
    if not isinstance(spec, list):
        return  # a constant
    ok = _is_domain(spec)
    if ok and spec[0] == "choice":
        ok = len(spec) == 2 and isinstance(spec[1], list) and len(spec[1]) > 0
    elif ok:
        try:
            low, high = float(spec[1]), float(spec[2])
            ok = len(spec) == 3 and math.isfinite(low) and math.isfinite(high) and low < high
            ok = ok and (spec[0] != "loguniform" or low > 0)
        except (ValueError, TypeError, IndexError):
            ok = False
    if not ok:
        raise ConfigError(
            f'search.space.{name}: {spec!r} is not ["loguniform"|"uniform", low, high] with '
            'low < high (low > 0 for loguniform), ["choice", [values]], a constant, or a table of '
            "those by optimizer"
        )


def space_for(model: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULT_SPACE < MODEL_SPACE[model] < overrides (the config file's `search.space`), checked."""
    space = {**DEFAULT_SPACE, **MODEL_SPACE.get(model, {}), **(overrides or {})}
    unknown = sorted(set(space) - TRAIN_FIELDS - {"augment_strength"})
    if unknown:
        raise ConfigError(
            f"search.space: unknown parameter(s) {', '.join(unknown)}; use train settings or augment_strength"
        )
    # These define what is searched over, or the data every trial shares; they can't vary per trial.
    fixed = sorted(set(space) & FIXED_PER_SEARCH)
    if fixed:
        raise ConfigError(f"search.space: {', '.join(fixed)} cannot be searched; set them as train settings")
    for name, spec in space.items():
        _check_domain(name, spec)
    return space


def user_point(base: TrainConfig, space: dict[str, Any]) -> dict[str, Any]:
    """The user's own configuration as a point of `space` (constants excluded: every trial has them)."""
    point = {}
    for name, spec in space.items():
        if isinstance(spec, dict) or _is_domain(spec):
            point[name] = 1.0 if name == "augment_strength" else getattr(base, name)
    return point


def centre_lr(space: dict[str, Any], optimizer: str, lr: float) -> dict[str, Any]:
    """`space` with `optimizer`'s lr range re-centred on `lr` (the range test's suggestion): the
    same width in decades as the default, so the screen looks around what the data says."""
    spec = space.get("lr")
    branch = spec.get(optimizer) if isinstance(spec, dict) else None
    if not (_is_domain(branch) and branch[0] == "loguniform"):
        return space
    half_width = math.sqrt(float(branch[2]) / float(branch[1]))
    return {**space, "lr": {**spec, optimizer: ["loguniform", lr / half_width, lr * half_width]}}


def widen(space: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """`space` with every range stretched, and every choice extended, to hold `point`'s values
    (the user's configuration): a setting given on the command line is searched from, never dropped."""
    optimizer = point.get("optimizer")
    widened = {}
    for name, spec in space.items():
        if name not in point:
            widened[name] = spec
        elif isinstance(spec, dict):
            widened[name] = {
                key: _widen_one(inner, point[name]) if key == optimizer else inner for key, inner in spec.items()
            }
            if optimizer not in spec:  # e.g. the user's `adam` where the table has no row: their value alone
                widened[name][optimizer] = point[name]
        else:
            widened[name] = _widen_one(spec, point[name])
    return widened


def _widen_one(spec: Any, value: Any) -> Any:
    if not _is_domain(spec):
        return spec
    kind, *args = spec
    if kind == "choice":
        return spec if value in args[0] else ["choice", [*args[0], value]]
    low, high = float(args[0]), float(args[1])
    return [kind, min(low, float(value)), max(high, float(value))]


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """Optuna's define-by-run space: draw each parameter (the optimizer first, then the ranges
    that depend on it) and return the constants, which OptunaSearch adds to the trial's config."""
    constants: dict[str, Any] = {}
    drawn: dict[str, Any] = {}
    for name in sorted(space, key=lambda n: n != "optimizer"):
        spec = space[name]
        if isinstance(spec, dict):
            spec = spec.get(drawn.get("optimizer", constants.get("optimizer")))
        if not _is_domain(spec):
            if spec is not None:
                constants[name] = spec
            continue
        kind, *args = spec
        if kind == "choice":
            drawn[name] = trial.suggest_categorical(name, list(args[0]))
        else:
            drawn[name] = trial.suggest_float(name, float(args[0]), float(args[1]), log=kind == "loguniform")
    return constants


def trial_config(base: TrainConfig, params: dict[str, Any], **fidelity: Any) -> TrainConfig:
    """The TrainConfig of one trial: the base run settings with the sampled parameters applied,
    and `fidelity` (image_size, epochs) for a screening run. `augment_strength` scales the *base*
    augmentation (so `--augment none` stays none, and `rotation=30` is what a strength of 1 means)."""
    strength = float(params.get("augment_strength", 1.0))
    values = {
        **base.to_dict(),
        **{name: getattr(base, name) * (1.0 if name in UNSCALED else strength) for name in AUGMENTATIONS},
    }
    values.update({k: v for k, v in params.items() if k != "augment_strength"})
    values.update(fidelity)
    return TrainConfig.from_dict(values)


def describe(params: dict[str, Any]) -> str:
    """`lr=0.001, optimizer=adamw, ...`: a point, for the console and the report."""
    return ", ".join(f"{k}={f'{v:.3g}' if isinstance(v, float) else v}" for k, v in sorted(params.items()))
