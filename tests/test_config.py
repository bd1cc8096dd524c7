"""gendertune.base.config: the numeric checks every stage config gets from its fields' declared
bounds (plus finiteness), before its own validate."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gendertune.base.config import Bounds, ConfigError, StageConfig
from gendertune.data_prep.config import PrepConfig
from gendertune.tuning.compare.config import CompareConfig
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.train.config import AUGMENTATIONS, TrainConfig

PATHS = {"data": "d", "out": "o"}
# The values a hostile user tried (issue 21): each passed validation and broke a run later.
REFUSED = [
    (TrainConfig, "weight_decay", float("nan"), "train.weight_decay: must be a finite number"),
    (TrainConfig, "warmup_epochs", "nan", "train.warmup_epochs: must be a finite number"),
    (TrainConfig, "cpus_per_worker", float("nan"), "train.cpus_per_worker: must be a finite number"),
    (TrainConfig, "momentum", -1, r"train.momentum: must be in \[0, 1\), got -1"),
    (TrainConfig, "step_epochs", 0, r"train.step_epochs: must be in \[1, inf\), got 0"),
    (TrainConfig, "step_gamma", -3, r"train.step_gamma: must be in \(0, 1\], got -3"),
    (TrainConfig, "grad_clip", float("inf"), "train.grad_clip: must be a finite number, got inf"),
    (TrainConfig, "seed", -1, "train.seed: must be in"),
    (PrepConfig, "face_min_score", float("nan"), "prep.face_min_score: must be a finite number"),
    (PrepConfig, "seed", -1, r"prep.seed: must be in \[0, 4294967295\], got -1"),
    (PrepConfig, "ratios", [0.5, float("nan")], "prep.ratios: must be a finite number"),
    (SearchConfig, "time_budget_s", float("nan"), "search.time_budget_s: must be a finite number"),
]


@pytest.mark.parametrize(
    "config, name, value, message", REFUSED, ids=[f"{c.section}.{n}={v}" for c, n, v, _ in REFUSED]
)
def test_non_finite_and_out_of_range_numbers_are_refused(config, name, value, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict({**(PATHS if "data" in {f.name for f in dataclasses.fields(config)} else {}), name: value})


def test_interval_notation():
    assert 0 not in Bounds.parse("(0, 1]") and 1 in Bounds.parse("(0, 1]") and 0.5 in Bounds.parse("(0, 1]")
    assert 1e12 in Bounds.parse("[1, inf)") and 0.999 not in Bounds.parse("[1, inf)")
    with pytest.raises(ValueError, match="write an interval"):
        Bounds.parse("0..1")


@pytest.mark.parametrize("config", [PrepConfig, TrainConfig, SearchConfig, CompareConfig])
def test_every_number_declares_its_range_and_the_defaults_are_inside_it(config):
    numeric = [f for f in dataclasses.fields(config) if f.type in ("int", "float", "tuple[float, ...]")]
    assert numeric
    # The augmentation strengths' ranges are TrainAugment's own (gendertune.models.transforms), checked by validate.
    undeclared = [
        f.name
        for f in numeric
        if f.metadata["bounds"] is None and f.name not in AUGMENTATIONS and f.type != "tuple[float, ...]"
    ]
    assert undeclared == [], f"declare bounds=... on {undeclared}"
    instance = config(**{k: v for k, v in PATHS.items() if k in {f.name for f in dataclasses.fields(config)}})
    instance.check_numbers()


def test_config_json_never_holds_nan():
    with pytest.raises(ConfigError, match="train.weight_decay: must be a finite number"):
        TrainConfig(data="d", out="o", weight_decay=float("nan"))  # refused when built
    config = TrainConfig(data="d", out="o")
    config.weight_decay = float("nan")  # changed around the checks: still never written as JSON
    with pytest.raises(ValueError, match="not JSON compliant"):
        config.to_json()
    assert json.loads(TrainConfig(data="d", out="o").to_json())["train"]["weight_decay"] == 0.05


def test_a_new_stage_gets_the_checks_from_its_declarations():
    from gendertune.base.config import setting

    @dataclasses.dataclass
    class Toy(StageConfig):
        section = "toy"
        rate: float = setting(0.5, help="a rate", bounds="(0, 1)")

    assert Toy.from_dict({"rate": 0.25}).rate == 0.25
    with pytest.raises(ConfigError, match=r"toy.rate: must be in \(0, 1\), got 1.0"):
        Toy.from_dict({"rate": 1})


def test_a_setting_added_since_a_run_was_saved_counts_as_its_default():
    current = json.loads(TrainConfig.from_dict({"data": "p", "out": "o"}).to_json())["train"]
    older = {k: v for k, v in current.items() if k not in ("mixup", "eval_sets")}  # as an older version saved it
    assert TrainConfig.with_new_defaults(older) == current
    changed = {**older, "lr": 0.5}
    assert TrainConfig.with_new_defaults(changed) != current  # a real difference still shows
