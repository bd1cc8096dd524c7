"""gendertune.tuning.search.policy: the budget plan for given costs, and the guard against noise."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from gendertune.tuning.search.policy import (
    COST_TOLERANCE,
    MAX_DUEL_TRIM,
    MAX_FINAL_TRIM,
    Costs,
    calibrated,
    final_run_epochs,
    full_run_s,
    guard_paired,
    guard_unpaired,
    keep_lr,
    plan_search,
)

# Costs like resnet18 at 64 px on 2 cores: ~50 s per epoch, a quarter of that at 32 px.
COSTS = Costs(epoch_s=50.0, screen_epoch_s=12.5, lr_test_s=20.0, run_overhead_s=30.0)
ONE_RUN = 12 * COSTS.epoch_s + COSTS.run_overhead_s  # 630 s


def plan(budget_s: float, **kwargs):
    settings = dict(epochs=12, budget_s=budget_s, trials=8, screen_epochs=3, screen_size=32)
    return plan_search(COSTS, **{**settings, **kwargs})


@pytest.mark.parametrize("rho", [1.1, 1.5, 1.9])
def test_a_budget_of_about_one_run_keeps_the_final_run_at_full_length(rho):
    p = plan(rho * ONE_RUN)
    assert p.regime == "parity" and p.full_runs == 1 and p.final_epochs == 12 and p.lr_test
    assert p.total_s <= rho * ONE_RUN + 1e-6
    assert p.planned_s["screening"] >= 0
    assert math.ceil((1 - MAX_DUEL_TRIM) * 12) <= p.duel_final_epochs <= 12
    # The printed plan says what a duel would do to the final run: nothing, or shorten it.
    assert p.duel_final_epochs < 12 or "a duel with the lr test's challenger, if any, fits beside it" in p.note


def test_a_budget_of_one_run_within_the_cost_tolerance_keeps_it_whole():
    p = plan(ONE_RUN)
    assert p.regime == "parity" and p.lr_test and p.final_epochs == 12
    assert p.total_s <= ONE_RUN * (1 + COST_TOLERANCE)


def test_a_budget_just_short_of_one_run_trims_it_by_at_most_a_tenth_for_the_lr_test():
    p = plan(0.85 * ONE_RUN)
    assert p.regime == "parity" and p.lr_test and math.ceil((1 - MAX_FINAL_TRIM) * 12) <= p.final_epochs < 12
    assert p.total_s <= 0.85 * ONE_RUN * (1 + COST_TOLERANCE)
    assert p.duel_final_epochs >= math.ceil((1 - MAX_DUEL_TRIM) * 12)
    assert p.duel_final_epochs < p.final_epochs and f"may shorten it to {p.duel_final_epochs})" in p.note


def test_a_budget_below_one_run_shortens_the_users_run_and_screens_nothing():
    p = plan(0.6 * ONE_RUN)
    assert p.regime == "final-only" and not p.lr_test and p.screen_trials == 0
    assert p.final_epochs == int((0.6 * ONE_RUN * (1 + COST_TOLERANCE) - COSTS.run_overhead_s) // COSTS.epoch_s) < 12


def test_a_budget_that_cannot_hold_one_epoch_is_refused():
    with pytest.raises(ValueError, match="one epoch takes"):
        plan(COSTS.run_overhead_s + 0.5 * COSTS.epoch_s)


def test_the_time_spent_measuring_counts_against_the_budget():
    measured = dataclasses.replace(COSTS, planning_s=0.6 * ONE_RUN)
    p = plan_search(measured, epochs=12, budget_s=2.5 * ONE_RUN, trials=8, screen_epochs=3, screen_size=32)
    # 1.9 runs left after measuring: no room for a second full run, which 2.5 runs would hold.
    assert p.regime == "parity" and plan(2.5 * ONE_RUN).regime == "search"
    assert p.planned_s["planning"] == 0.6 * ONE_RUN and p.total_s <= 2.5 * ONE_RUN + 1e-6


def test_two_runs_of_budget_screen_and_retrain_the_best_challenger():
    p = plan(2.5 * ONE_RUN)
    assert p.regime == "search" and p.full_runs == 2 and p.final_epochs == 12
    assert 2 <= p.screen_trials <= 8 and p.total_s <= 2.5 * ONE_RUN + 1e-6
    assert plan(2.5 * ONE_RUN, retrain_challenger=False).regime == "parity"


def test_screening_trials_run_at_once_take_less_time():
    one, two = plan(2.5 * ONE_RUN, trials=4), plan(2.5 * ONE_RUN, trials=4, concurrent=2)
    assert two.planned_s["screening"] < one.planned_s["screening"]


def test_without_a_budget_the_trials_setting_decides():
    p = plan(0, trials=5)
    assert p.regime == "trials" and p.screen_trials == 5 and p.full_runs == 2 and p.final_epochs == 12
    assert plan(0, trials=1).full_runs == 1


def test_the_paired_guard_keeps_the_user_inside_the_noise_and_replaces_past_it():
    rng = np.random.default_rng(0)
    incumbent = rng.random(534) < 0.9
    same = incumbent.copy()
    assert not guard_paired(incumbent, same).replace  # identical predictions prove nothing
    flipped = incumbent.copy()
    wrong = np.flatnonzero(~incumbent)
    flipped[wrong[:3]] = True  # 3 more right of 534: +0.56 points, inside the noise
    verdict = guard_paired(incumbent, flipped)
    assert not verdict.replace and verdict.difference == pytest.approx(3 / 534) and verdict.paired
    better = incumbent.copy()
    better[wrong[:30]] = True  # +5.6 points
    assert guard_paired(incumbent, better).replace


def test_the_unpaired_guard_needs_more_than_the_paired_one():
    n = 534
    incumbent = np.arange(n) < 481  # 90.1%
    challenger = incumbent.copy()
    challenger[481:511] = True  # 30 images only the challenger gets right
    challenger[:14] = False  # 14 only the incumbent gets: 93.1% vs 90.1%
    paired = guard_paired(incumbent, challenger)
    unpaired = guard_unpaired(incumbent.mean(), challenger.mean(), n)
    assert paired.difference == pytest.approx(unpaired.difference) == pytest.approx(16 / n)
    assert paired.replace and not unpaired.replace and unpaired.threshold > paired.threshold
    assert guard_unpaired(0.70, 0.85, n).replace and not guard_unpaired(0.90, 0.91, n).replace


def test_the_lr_test_keeps_a_users_lr_near_its_suggestion():
    assert keep_lr(1e-3, 2e-3) and keep_lr(1e-3, 3.9e-3) and not keep_lr(2e-5, 2e-3) and not keep_lr(0.1, 2e-3)


def test_screening_epochs_slower_than_the_probe_said_shorten_the_final_run_to_its_reserved_time():
    p = plan(1.5 * ONE_RUN)
    reserved = p.planned_s["full_runs"]
    # As planned: the reservation holds the planned epochs exactly, and leftover time adds none beyond the asked 12.
    assert final_run_epochs(p, COSTS, left_s=reserved, reserved_s=reserved) == p.final_epochs == 12
    assert final_run_epochs(p, COSTS, left_s=10 * ONE_RUN, reserved_s=reserved) == 12
    # Screening overran its share: the final run still gets what the plan reserved for it.
    assert final_run_epochs(p, COSTS, left_s=0.5 * reserved, reserved_s=reserved) == 12
    # Real screening epochs took 1.5x the probe's estimate: so will the final run's.
    slow = calibrated(COSTS, 1.5 * COSTS.screen_epoch_s)
    assert slow.epoch_s == 1.5 * COSTS.epoch_s and calibrated(COSTS, None) == COSTS
    assert calibrated(COSTS, 0.5 * COSTS.screen_epoch_s) == COSTS  # faster than the probe: no longer runs
    epochs = final_run_epochs(p, slow, left_s=reserved, reserved_s=reserved)
    assert epochs == int((reserved - COSTS.run_overhead_s) // slow.epoch_s) == 8
    assert full_run_s(slow, epochs) <= reserved < full_run_s(slow, epochs + 1)
