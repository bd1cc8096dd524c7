"""SearchConfig: one model's search settings, validated before Ray starts anything (no Ray here)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gendertune.base.config import ConfigError, StageConfig, setting


@dataclasses.dataclass
class SearchConfig(StageConfig):
    section = "search"

    trials: int = setting(8, help="Optuna trials per model")
    time_budget_s: float = setting(0.0, help="stop starting trials after this long, per model; 0 = no limit")
    max_concurrent: int = setting(0, help="trials at once; 0 = as many as the CPUs allow: cores // CPUs per trial")
    grace_period: int = setting(1, help="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = setting(2, help="ASHA: keep 1/reduction_factor of the trials at each rung")
    # The command line's --seed sets it and the runs' seed together (gendertune.cli).
    seed: int = setting(0, help="the seed of the search's Optuna sampler")
    trial_mode: Literal["auto", "train", "inprocess"] = setting(
        "auto", help="train = each trial launches a TorchTrainer; inprocess = 1-worker trials run in the trial "
        "process (no worker start-up); auto = inprocess for 1 worker")
    space: dict = setting(default_factory=dict, help="overrides of gendertune.tuning.search.space", flag=False)

    def validate(self) -> None:
        if self.trials < 1:
            raise ConfigError("search.trials: must be >= 1")
        if self.time_budget_s < 0 or self.max_concurrent < 0:
            raise ConfigError("search.time_budget_s and search.max_concurrent must be >= 0")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("search.grace_period must be >= 1 and search.reduction_factor >= 2")

