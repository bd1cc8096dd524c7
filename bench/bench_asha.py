"""ASHA's savings in `gendertune.tuning.search.run`: epochs spent vs the full budget to reach the best accuracy (goal <= 0.35).

The project's own `gendertune.tuning.search.run.run_search` (Ray Tune + OptunaSearch + ASHA) trains a fixed list
of configurations: the first --trials suggestions of an `OptunaSearch(seed=--seed)` over
`gendertune.tuning.search.space.param_space(--model)`, the configurations a real search starts with, given to
the search as `points_to_evaluate`, so every search here trains exactly the same ones.

Each configuration is trained once for the full --epochs with no early stopping (the same search,
with ASHA's grace period set to the full budget, so its only rung is the last epoch), recording
every epoch's val_acc and when each result arrived at the driver (a Tune callback,
searchlib.SearchRecorder). ASHA is then replayed offline on those learning curves with Ray's own
`ASHAScheduler` (same max_t, grace_period and reduction_factor as `run_search` gives it from
`SearchConfig`'s defaults: rungs at grace * rf^k, a trial stopped at a rung when its val_acc is
below the (1 - 1/rf) quantile of the results recorded at that rung so far), fed the results in the
order a search would produce them: trials started in suggestion order into `concurrency` slots
(the search's own max_concurrent on this machine), each epoch taking as long as it took in the
full run (the first from the trial's creation, start-up included). A stopped trial's later epochs
are not spent. Counted: epochs_full = trials * epochs, epochs_asha = epochs the replay ran;
best_full = the best val_acc of any trial at any epoch (what `run_search` picks) and best_asha =
the best among the epochs ASHA ran; ASHA "keeps the best" when best_asha >= best_full - 0.5 pt.
Also shown: the replay one trial at a time, the mean over 200 shuffled trial orders, and other
reduction factors. --cross-check also runs the real ASHA search on the same configurations and
prints the epochs it spent (its trials reuse the full run's seeds, so the curves should match;
the largest val_acc difference at a common epoch is printed too).

Data: a generated SYNTHETIC sample of --sample-n images prepped at --image-size with an identity
split (80/10/10) into a temporary folder (removed at the end), or --prep DIR for an existing prep
output. The default 1,000-image sample has about 100 validation images, one image is worth about
a point, so there "within 0.5 pt" means "the same accuracy".
"""

from __future__ import annotations

import argparse
import heapq
import math
import statistics
from types import SimpleNamespace

import numpy as np
from benchlib import format_table, write_json
from searchlib import Bench, add_data_args, bench_session, suggested_configs

from gendertune.cluster.runtime import compute_parallelism
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.search.run import METRIC
from gendertune.tuning.train.config import TrainConfig

ASHA_GOAL = 0.35  # epochs with ASHA / epochs at the full budget
TOLERANCE = 0.005  # "reaches the best accuracy": within 0.5 percentage points
SHUFFLES = 200


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(parser)
    parser.add_argument("--trials", type=int, default=8, help="configurations (default 8)")
    parser.add_argument("--epochs", type=int, default=5, help="full epoch budget per trial (default 5)")
    parser.add_argument(
        "--cross-check",
        action="store_true",
        help="also run the real ASHA search on the same configurations (about half the full run again)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: --sample-n 200 --trials 2 --epochs 2, no cross-check"
    )
    args = parser.parse_args()
    if args.quick:
        args.sample_n, args.trials, args.epochs, args.cross_check = 200, 2, 2, False
    if args.trials < 2 or args.epochs < 2:
        parser.error("--trials and --epochs must be >= 2")
    return args


def replay_asha(
    curves: list[list[float]],
    durations: list[list[float]],
    order: list[int],
    *,
    max_t: int,
    grace: int,
    rf: int,
    concurrency: int,
    target: float,
) -> dict:
    """Feed the recorded learning curves to Ray's ASHAScheduler as a search would, return what it spent.

    Trials start in `order` into `concurrency` slots; trial i's epoch e result arrives durations[i][e-1]
    seconds after its previous one (after its start for e=1). Results are handled in arrival order,
    as Tune's controller does: scheduler.on_trial_result, and on STOP (or the last epoch)
    on_trial_complete, which frees the slot for the next trial.
    """
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    scheduler = ASHAScheduler(
        metric=METRIC,
        mode="max",
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=min(grace, max_t),
        reduction_factor=rf,
    )
    pending, heap, spent, counter, now = list(order), [], {}, 0, 0.0
    to_target = None  # epochs spent (all trials) when a result first reached `target`

    def start(i: int, now: float) -> None:
        nonlocal counter
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=str(i)))
        heapq.heappush(heap, (now + durations[i][0], counter, i, 1))
        counter += 1

    for _ in range(min(concurrency, len(pending))):
        start(pending.pop(0), 0.0)
    while heap:
        now, _, i, epoch = heapq.heappop(heap)
        trial, result = SimpleNamespace(trial_id=str(i)), {"training_iteration": epoch, METRIC: curves[i][epoch - 1]}
        decision = scheduler.on_trial_result(None, trial, result)
        spent[i] = epoch
        if to_target is None and curves[i][epoch - 1] >= target:
            to_target = sum(spent.values())
        if decision == TrialScheduler.STOP or epoch >= len(curves[i]):
            scheduler.on_trial_complete(None, trial, result)
            if pending:
                start(pending.pop(0), now)
        else:
            heapq.heappush(heap, (now + durations[i][epoch], counter, i, epoch + 1))
            counter += 1
    best = max(max(curves[i][: spent[i]]) for i in spent)
    return {
        "epochs": sum(spent.values()),
        "per_trial": [spent[i] for i in range(len(curves))],
        "best": best,
        "wall_s": now,
        "epochs_to_target": to_target,
    }


def run_asha(bench: Bench) -> dict:
    args = bench.args
    points = suggested_configs(args.model, args.trials, args.seed)
    full_base = TrainConfig.from_dict({**bench.base.to_dict(), "epochs": args.epochs})
    defaults = SearchConfig()
    # run_search's own concurrency rule (SearchConfig.max_concurrent = 0).
    concurrency = max(1, compute_parallelism() // math.ceil(full_base.cpus_per_worker * full_base.workers))
    no_stop = SearchConfig.from_dict({"trials": args.trials, "grace_period": args.epochs, "seed": args.seed})
    trials = bench.search("full-budget", full_base, no_stop, points)
    if len(trials) != args.trials or any(len(t["results"]) != args.epochs for t in trials):
        raise RuntimeError(
            "the full-budget search did not run every trial to the full budget: "
            + ", ".join(f"{t['trial']} {len(t['results'])} epochs" for t in trials)
        )
    curves = [[r[METRIC] for r in t["results"]] for t in trials]
    durations = [np.diff([t["created"]] + [r["t"] for r in t["results"]]).tolist() for t in trials]
    best_full = max(max(c) for c in curves)
    epochs_full = args.trials * args.epochs
    kw = {
        "max_t": args.epochs,
        "grace": defaults.grace_period,
        "rf": defaults.reduction_factor,
        "target": best_full - TOLERANCE - 1e-9,
    }
    order = list(range(args.trials))
    replay = replay_asha(curves, durations, order, concurrency=concurrency, **kw)
    sequential = replay_asha(curves, durations, order, concurrency=1, **kw)
    # The full run replayed the same way (ASHA never stopping): the wall-clock baseline of the replays.
    full = replay_asha(curves, durations, order, concurrency=concurrency, **{**kw, "grace": args.epochs})
    full_wall = full["wall_s"]
    rng = np.random.default_rng(args.seed)
    orders = [rng.permutation(args.trials).tolist() for _ in range(SHUFFLES)]
    shuffled = [replay_asha(curves, durations, o, concurrency=concurrency, **kw) for o in orders]
    # The same curves under other reduction factors: what `--reduction-factor` would trade.
    by_rf = {}
    for rf in (2, 3, 4):
        runs = [
            replay_asha(curves, durations, o, concurrency=concurrency, **{**kw, "rf": rf}) for o in [order, *orders]
        ]
        by_rf[rf] = {
            "ratio_search_order": runs[0]["epochs"] / epochs_full,
            "mean_ratio": statistics.fmean(r["epochs"] for r in runs[1:]) / epochs_full,
            "kept_best_share": sum(r["best"] >= kw["target"] for r in runs[1:]) / SHUFFLES,
        }

    def kept(r: dict) -> bool:
        return r["best"] >= best_full - TOLERANCE - 1e-9

    asha = bench.report["asha"] = {
        "configs": points,
        "epochs": args.epochs,
        "grace_period": defaults.grace_period,
        "reduction_factor": defaults.reduction_factor,
        "concurrency": concurrency,
        "curves": curves,
        "epoch_seconds": durations,
        "epochs_full": epochs_full,
        "best_full": best_full,
        "epochs_asha": replay["epochs"],
        "best_asha": replay["best"],
        "ratio": replay["epochs"] / epochs_full,
        "wall_full_s": full_wall,
        "wall_asha_s": replay["wall_s"],
        "kept_best": kept(replay),
        "per_trial_epochs": replay["per_trial"],
        "sequential": {**sequential, "ratio": sequential["epochs"] / epochs_full, "kept_best": kept(sequential)},
        "shuffled": {
            "orders": SHUFFLES,
            "mean_ratio": statistics.fmean(r["epochs"] for r in shuffled) / epochs_full,
            "min_ratio": min(r["epochs"] for r in shuffled) / epochs_full,
            "max_ratio": max(r["epochs"] for r in shuffled) / epochs_full,
            "kept_best_share": sum(kept(r) for r in shuffled) / SHUFFLES,
        },
        # Epochs spent, all trials together, until some trial first reached best_full - 0.5 pt.
        "epochs_to_target_asha": replay["epochs_to_target"],
        "epochs_to_target_full": full["epochs_to_target"],
        "by_reduction_factor": by_rf,
    }
    write_json(args.json, bench.report)

    print(
        f"\nlearning curves (val_acc per epoch), full budget, and epochs the ASHA replay gives each "
        f"(grace {defaults.grace_period}, rf {defaults.reduction_factor}, max_t {args.epochs}, "
        f"{concurrency} at a time):"
    )
    rows = []
    for i, (t, curve) in enumerate(zip(trials, curves)):
        c = t["config"]
        rows.append(
            (
                i,
                c.get("optimizer"),
                f"{c.get('lr', 0):.2e}",
                c.get("batch_size"),
                " ".join(f"{v:.3f}" for v in curve),
                replay["per_trial"][i],
                sequential["per_trial"][i],
            )
        )
    print(format_table(["config", "opt", "lr", "batch", "val_acc per epoch", "asha ep", "asha ep (1 at a time)"], rows))

    if args.cross_check:
        real = bench.search(
            "asha-real", full_base, SearchConfig.from_dict({"trials": args.trials, "seed": args.seed}), points
        )
        spent = sum(len(t["results"]) for t in real)
        best_real = max(r[METRIC] for t in real for r in t["results"])
        diff = max(
            (
                abs(r[METRIC] - curves[t["index"]][r["training_iteration"] - 1])
                for t in real
                if t["index"] is not None
                for r in t["results"]
            ),
            default=float("nan"),
        )
        asha["real"] = {
            "epochs": spent,
            "ratio": spent / epochs_full,
            "best": best_real,
            "kept_best": best_real >= best_full - TOLERANCE - 1e-9,
            "per_trial_epochs": [len(t["results"]) for t in real],
            "max_val_acc_diff_vs_full": diff,
        }
        write_json(args.json, bench.report)

    print()
    table = [
        ("full budget (replayed)", epochs_full, 1.0, best_full, True, full_wall, 1.0),
        (
            "ASHA replay, search order",
            replay["epochs"],
            replay["epochs"] / epochs_full,
            replay["best"],
            kept(replay),
            replay["wall_s"],
            replay["wall_s"] / full_wall,
        ),
        (
            "ASHA replay, 1 at a time",
            sequential["epochs"],
            sequential["epochs"] / epochs_full,
            sequential["best"],
            kept(sequential),
            "-",
            "-",
        ),
    ]
    if "real" in asha:
        r = asha["real"]
        table.append(("real ASHA search", r["epochs"], r["ratio"], r["best"], r["kept_best"], "-", "-"))
    print(format_table(["run", "epochs", "/ full", "best val_acc", "within 0.5 pt", "wall s", "/ full"], table))
    print("(wall s: the replay's makespan from the full run's per-epoch times, first epoch incl. trial start-up)")
    s = asha["shuffled"]
    print(
        f"epochs_full {epochs_full} ({args.trials} trials x {args.epochs}), best_full {best_full:.4f}; "
        f"epochs_asha {replay['epochs']}, best_asha {replay['best']:.4f}"
    )
    print(
        f"over {SHUFFLES} shuffled trial orders: ratio mean {s['mean_ratio']:.2f} (range {s['min_ratio']:.2f}-"
        f"{s['max_ratio']:.2f}), best kept within 0.5 pt in {s['kept_best_share']:.0%}"
    )
    print(
        f"epochs spent until a trial first reached best_full - 0.5 pt: ASHA {asha['epochs_to_target_asha']}, "
        f"full budget {asha['epochs_to_target_full']} (of {epochs_full}; in search order, so this says more about "
        "the order than about ASHA)"
    )
    print(
        format_table(
            ["reduction factor", "epochs / full (search order)", "mean over shuffles", "best kept (shuffles)"],
            [
                (rf, f"{v['ratio_search_order']:.2f}", f"{v['mean_ratio']:.2f}", f"{v['kept_best_share']:.0%}")
                for rf, v in by_rf.items()
            ],
        )
    )
    if "real" in asha:
        print(
            f"real ASHA search: largest val_acc difference from the full run at a common epoch "
            f"{asha['real']['max_val_acc_diff_vs_full']:.4f} (0 = the replayed curves are exactly what it saw)"
        )
    return asha


def main() -> None:
    args = parse_args()
    with bench_session(args, "asha") as bench:
        asha = run_asha(bench)
    print(
        f"\nRATIO asha_epochs: {asha['ratio']:.2f} (goal <= {ASHA_GOAL:g}; best_asha {asha['best_asha']:.4f} vs "
        f"best_full {asha['best_full']:.4f}: {'within' if asha['kept_best'] else 'NOT within'} 0.5 pt)"
    )


if __name__ == "__main__":
    main()
