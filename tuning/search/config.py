"""SearchConfig: one model's search settings, validated before Ray starts anything (no Ray here)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gendertune.base.config import SEED_BOUNDS, StageConfig, setting


@dataclasses.dataclass
class SearchConfig(StageConfig):
    section = "search"

    trials: int = setting(
        8,
        help="screening trials per model, the user's configuration included; with "
        "--time-budget-s, at most this many (the plan fits what the budget holds)",
        bounds="[1, inf)",
    )
    time_budget_s: float = setting(
        0.0,
        help="wall-clock seconds per model for measuring, screening and the full-length run(s), planned from "
        "measured speed before anything trains: screening stops at its share, the final run is shortened to fit "
        "(its schedule re-spanned, its epochs' cost re-measured by screening) and never cut mid-schedule; "
        "0 = no limit (--trials screening trials, then two full runs)",
        bounds="[0, inf)",
    )
    max_concurrent: int = setting(
        0, help="screening trials at once; 0 = one per GPU, or one per 4 CPU cores", bounds="[0, inf)"
    )
    screen_epochs: int = setting(
        0, help="epochs of a screening run (at half the image side); 0 = max(2, epochs / 4)", bounds="[0, inf)"
    )
    lr_test_steps: int = setting(
        100, help="steps of the learning-rate range test that starts the search", bounds="[20, inf)"
    )
    retrain_challenger: bool = setting(
        True,
        help="train the best screened challenger at full length too, when the budget holds two runs, and "
        "choose between the two complete runs; off = decide at screening fidelity (one full run)",
    )
    # 2 SE: one-sided p ~ 0.02 that a challenger this far ahead is not better at all.
    guard_z: float = setting(
        2.0,
        help="a challenger replaces your configuration only when it beats it on validation by more than this "
        "many standard errors of the difference",
        bounds="[0, inf)",
    )
    scheduler: Literal["auto", "asha", "fifo"] = setting(
        "auto",
        help="screening's scheduler: asha stops weak screening runs early; fifo lets each finish; "
        "auto = asha from 6 screening trials",
    )
    grace_period: int = setting(
        1, help="ASHA: screening epochs every trial gets before it can be stopped", bounds="[1, inf)"
    )
    reduction_factor: int = setting(
        3, help="ASHA: keep 1/reduction_factor of the trials at each rung", bounds="[2, inf)"
    )
    # The command line's --seed sets it and the runs' seed together (gendertune.cli).
    seed: int = setting(0, help="the seed of the search's Optuna sampler", bounds=SEED_BOUNDS)
    trial_mode: Literal["auto", "train", "inprocess"] = setting(
        "auto",
        help="train = each trial launches a TorchTrainer; inprocess = 1-worker trials run in the trial "
        "process (no worker start-up); auto = inprocess for 1 worker",
    )
    space: dict = setting(default_factory=dict, help="overrides of gendertune.tuning.search.space", flag=False)
