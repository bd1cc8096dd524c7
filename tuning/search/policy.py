"""The search's budget policy, as pure functions: what to spend the budget on, planned from measured
costs before anything trains, and when a challenger may replace the user's configuration.

Why this shape (../docs/design.md, "The search"): on a small machine a budget the size of one
training run cannot hold a search of truncated runs that beats that run. So the policy first
*reserves* one full-length run, with all threads and its schedule annealed to zero at its end;
spends what is left on *screening* that is cheap because it lowers the fidelity (fewer pixels,
fewer epochs, an lr range test) while every screened run still finishes its own schedule; lets a
challenger replace the user's configuration only when it wins on validation by more than the
validation noise (`guard`); and trains the final model at full length through `train`'s code
path. When the budget holds two full runs, the best screened challenger is also trained at full
length, and the guard chooses between the two complete runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

# When the budget is about one run, the final run is at most this much shorter than asked to make
# room for the lr range test (shorter than that, screening is skipped instead), and at most
# MAX_DUEL_TRIM shorter to also duel the test's challenger, which only happens when the user's lr
# is far from the test's suggestion.
MAX_FINAL_TRIM = 0.10
MAX_DUEL_TRIM = 0.25
# The measured costs come from a few timed steps, which vary by about this much on a shared
# machine: a final run that fits within it is not shortened (a result a little late beats a
# schedule cut by a slow spell during the measurement).
COST_TOLERANCE = 0.15
# A challenger must beat the incumbent by this many standard errors of the difference (one-sided
# p ~ 0.02 under no difference).
GUARD_Z = 2.0
# The lr range test keeps the user's lr when it lies within this factor of the suggestion.
LR_TOLERANCE = 4.0

Regime = Literal["final-only", "parity", "search", "trials"]


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds, measured on this machine before the search (`run.measure_costs`)."""

    epoch_s: float  # one full-fidelity epoch, train + val, with the threads a run gets
    screen_epoch_s: float  # one low-fidelity epoch
    lr_test_s: float  # the lr range test
    run_overhead_s: float  # a full run's fixed cost: start-up, checkpoints, held-out evaluation
    trial_overhead_s: float = 2.0  # one screening trial's fixed cost (a reused trial actor)
    planning_s: float = 0.0  # already spent measuring these costs: part of the budget too


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one model's search will run; saved with the comparison and drawn in the report."""

    regime: Regime
    budget_s: float  # 0 = no time budget: `trials` screening trials
    epochs: int  # what the user asked for
    final_epochs: int  # the full-fidelity runs' length (its cosine re-spans a shorter run)
    duel_final_epochs: int  # parity: the final run's length after a duel with the lr test's challenger
    full_runs: int  # 1: the chosen configuration; 2: the incumbent and the best challenger
    lr_test: bool
    screen_trials: int  # low-fidelity trials, the incumbent's included (0 = no screening)
    screen_epochs: int
    screen_image_size: int
    screen_trial_s: float  # one screening run's planned seconds
    concurrent: int  # screening trials at once
    planned_s: dict[str, float]  # seconds per part
    note: str  # one line: why this plan
    costs: dict = dataclasses.field(default_factory=dict)  # the measured Costs it was planned from

    @property
    def total_s(self) -> float:
        return float(sum(self.planned_s.values()))


def screen_image_size(image_size: int, min_size: int) -> int:
    """Half the pixels per side (a quarter of the cost), never below what the model accepts."""
    return max(min_size, image_size // 2)


def full_run_s(costs: Costs, epochs: int) -> float:
    return epochs * costs.epoch_s + costs.run_overhead_s


def plan_search(
    costs: Costs,
    *,
    epochs: int,
    budget_s: float,
    trials: int,
    screen_epochs: int,
    screen_size: int,
    concurrent: int = 1,
    retrain_challenger: bool = True,
) -> Plan:
    """The plan for one model. Without a budget, `trials` screening trials, then the incumbent and
    (with `retrain_challenger`) the best challenger at full length. With one, first the final run
    is reserved; see the module docstring. Raises ValueError when the budget cannot hold one epoch
    of the final run."""
    screen_trial_s = screen_epochs * costs.screen_epoch_s + costs.trial_overhead_s
    planning = {"planning": costs.planning_s}
    # What the parts below may spend: the budget runs from the search's start, measurement included.
    available = budget_s - costs.planning_s
    common = dict(
        costs=dataclasses.asdict(costs),
        epochs=epochs,
        screen_epochs=screen_epochs,
        screen_image_size=screen_size,
        concurrent=concurrent,
        screen_trial_s=screen_trial_s,
    )
    if not budget_s:
        n = max(1, trials)
        full_runs = 2 if n > 1 and retrain_challenger else 1
        parts = {
            **planning,
            "lr_test": costs.lr_test_s,
            "screening": math.ceil(n / concurrent) * screen_trial_s,
            "full_runs": full_runs * full_run_s(costs, epochs),
        }
        return Plan(
            regime="trials",
            budget_s=0.0,
            final_epochs=epochs,
            duel_final_epochs=epochs,
            full_runs=full_runs,
            lr_test=True,
            screen_trials=n,
            planned_s=parts,
            note=f"no time budget: {n} screening trial(s), then {full_runs} full run(s) of {epochs} epochs",
            **common,
        )
    one_run = full_run_s(costs, epochs)
    duel = 2 * screen_trial_s  # the incumbent and the lr test's challenger, each a complete short run
    screen_floor = costs.lr_test_s + duel
    if retrain_challenger and available >= 2 * one_run + screen_floor:
        left = available - 2 * one_run - costs.lr_test_s
        n = max(2, min(trials, int(left // screen_trial_s) * concurrent))
        parts = {
            **planning,
            "lr_test": costs.lr_test_s,
            "screening": math.ceil(n / concurrent) * screen_trial_s,
            "full_runs": 2 * one_run,
        }
        return Plan(
            regime="search",
            budget_s=budget_s,
            final_epochs=epochs,
            duel_final_epochs=epochs,
            full_runs=2,
            lr_test=True,
            screen_trials=n,
            planned_s=parts,
            note=f"the budget holds two full runs: lr range test, {n} screening trials at "
            f"{screen_size} px x {screen_epochs} epochs, then the incumbent and the best challenger at full "
            "length",
            **common,
        )
    # About one run: the final run first. The lr range test may take up to MAX_FINAL_TRIM of its
    # epochs; a duel with the test's challenger (only when the user's lr is far off, so the trim
    # costs less than the lr would) up to MAX_DUEL_TRIM; further screening only from what is left over.
    room = budget_s * (1 + COST_TOLERANCE) - costs.planning_s
    fit_epochs = int((room - costs.run_overhead_s) // costs.epoch_s)
    lr_epochs = min(epochs, int((room - costs.run_overhead_s - costs.lr_test_s) // costs.epoch_s))
    if lr_epochs >= math.ceil((1 - MAX_FINAL_TRIM) * epochs):
        duel_epochs = min(lr_epochs, int((room - costs.run_overhead_s - costs.lr_test_s - duel) // costs.epoch_s))
        left = available - full_run_s(costs, lr_epochs) - costs.lr_test_s
        n = min(trials, int(left // screen_trial_s) * concurrent)
        parts = {
            **planning,
            "lr_test": costs.lr_test_s,
            "screening": math.ceil(n / concurrent) * screen_trial_s if n >= 2 else 0.0,
            "full_runs": full_run_s(costs, lr_epochs),
        }
        trimmed = f", trimmed from {epochs} to fit" if lr_epochs < epochs else ""
        duel_final = max(duel_epochs, math.ceil((1 - MAX_DUEL_TRIM) * epochs)) if duel_epochs >= 1 else 0
        duel_note = (
            "a duel with the lr test's challenger, if any, fits beside it"
            if duel_final >= lr_epochs
            else f"a duel with the lr test's challenger, if any, may shorten it to {duel_final}"
        )
        return Plan(
            regime="parity",
            budget_s=budget_s,
            final_epochs=lr_epochs,
            full_runs=1,
            lr_test=True,
            screen_trials=n if n >= 2 else 0,
            duel_final_epochs=duel_final,
            planned_s=parts,
            note="the budget holds one full run: an lr range test"
            + (f" and {n} short screening runs" if n >= 2 else "")
            + f" first, then one final run of {lr_epochs} epochs{trimmed} ({duel_note})",
            **common,
        )
    if fit_epochs < 1:
        raise ValueError(
            f"one epoch takes ~{costs.epoch_s:.0f} s here (+{costs.run_overhead_s:.0f} s per run), more "
            f"than the budget of {budget_s:g} s holds after {costs.planning_s:.0f} s of measuring"
        )
    final = min(epochs, fit_epochs)
    return Plan(
        regime="final-only",
        budget_s=budget_s,
        final_epochs=final,
        duel_final_epochs=final,
        full_runs=1,
        lr_test=False,
        screen_trials=0,
        planned_s={**planning, "full_runs": full_run_s(costs, final)},
        note=f"the budget holds no screening beside the run: the user's configuration alone, {final} of "
        f"{epochs} epochs" + (" (its schedule re-spanned to end at zero)" if final < epochs else ""),
        **common,
    )


def calibrated(costs: Costs, observed_screen_epoch_s: float | None) -> Costs:
    """`costs` with both fidelities' epochs scaled up by what a screening epoch cost at the training
    speed real screening runs showed, against the probe's estimate of it, when that is more. The
    probe times the model's steps alone, on one batch it repeats; a real training pass also loads
    its batches and, on a small machine, shares the cores with the processes that do it (design.md,
    "The search")."""
    if not observed_screen_epoch_s or not costs.screen_epoch_s:
        return costs
    # Only ever slower: the probe at screening size is the noisier one (fewer pixels, shorter steps),
    # so a faster screening run says less about the full-size epochs than a slower one does.
    ratio = max(1.0, observed_screen_epoch_s / costs.screen_epoch_s)
    return dataclasses.replace(costs, epoch_s=costs.epoch_s * ratio, screen_epoch_s=costs.screen_epoch_s * ratio)


def final_run_epochs(plan: Plan, costs: Costs, *, left_s: float, reserved_s: float) -> int:
    """The final run's length at `costs`: what `left_s` of the budget holds (split between the plan's
    full runs), up to the epochs asked for, and never below what the plan reserved for each run
    (`reserved_s`): screening that overran cannot shorten it, and a probe that was too optimistic
    does not make it overrun the budget."""

    def holds(seconds: float) -> int:
        return int((seconds - costs.run_overhead_s) / costs.epoch_s + 1e-9)  # 1e-9: n * e / e may be n - eps

    return max(1, min(plan.epochs, max(holds(reserved_s), holds(left_s / plan.full_runs))))


# ---- the guard ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    replace: bool
    difference: float  # challenger - incumbent, accuracy on validation
    threshold: float  # what it had to exceed (GUARD_Z standard errors)
    paired: bool  # per-image outcomes (True) or accuracies and the set's size only (False)
    z: float = GUARD_Z  # the standard errors it had to win by

    def describe(self) -> str:
        basis = "paired" if self.paired else "unpaired"
        return (
            f"{self.difference * 100:+.2f} points on validation vs a threshold of {self.threshold * 100:.2f} "
            f"({self.z:g} {basis} SE)"
        )


def guard_paired(incumbent_correct: np.ndarray, challenger_correct: np.ndarray, *, z: float = GUARD_Z) -> Verdict:
    """Replace only when the challenger's validation accuracy exceeds the incumbent's by more than
    z standard errors of the paired difference on the same images, taken as McNemar's test takes
    it, under no difference: sqrt(b + c) / n, with b, c the discordant counts."""
    a, b = np.asarray(incumbent_correct, bool), np.asarray(challenger_correct, bool)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("guard_paired: both need the same, non-empty validation images")
    n = a.size
    only_challenger, only_incumbent = int(np.sum(b & ~a)), int(np.sum(a & ~b))
    # At least one image's worth of noise: two identical prediction sets prove nothing either way.
    threshold = z * max(math.sqrt(only_challenger + only_incumbent), 1.0) / n
    difference = (only_challenger - only_incumbent) / n
    return Verdict(replace=difference > threshold, difference=difference, threshold=threshold, paired=True, z=z)


def guard_unpaired(incumbent_acc: float, challenger_acc: float, n: int, *, z: float = GUARD_Z) -> Verdict:
    """The guard from accuracies and the validation set's size alone (screening trials report no
    per-image outcomes): the SE of a difference of two independent proportions, which is larger
    than the paired one, so a screening duel is harder to win than a full-run one."""
    if n < 1:
        raise ValueError("guard_unpaired: the validation set is empty")
    variance = (incumbent_acc * (1 - incumbent_acc) + challenger_acc * (1 - challenger_acc)) / n
    threshold = z * max(math.sqrt(variance), 1.0 / n)
    difference = challenger_acc - incumbent_acc
    return Verdict(replace=difference > threshold, difference=difference, threshold=threshold, paired=False, z=z)


def keep_lr(user_lr: float, suggested_lr: float, *, tolerance: float = LR_TOLERANCE) -> bool:
    """The lr range test confirms the user's lr when it lies within `tolerance` of the suggestion."""
    return suggested_lr / tolerance <= user_lr <= suggested_lr * tolerance
