"""Does a search pay? Each arm: one `train` of --model, timed end to end, then a `compare` of the same
model with the same settings and `--time-budget-s` set from that time; both scored once on the same
test split, with the difference and McNemar's p printed as RATIO lines.

- A, defaults: the user's configuration is the default one; budget = the train's time.
  Goal >= -0.5 points, and exactly 0.00 under --deterministic when the search kept the user's
  configuration at full length (it then trains through `train`'s own code path).
- B, a mis-set user configuration (--bad-lr, default 2e-5, which costs a default train >= 5 points):
  train and compare both with that lr; budget = that train's time. Goal: the search ahead by >= 3
  points with McNemar p < 0.05.
- C, twice the budget: A's train (not run again), compare with 2x its time. Goal: the search ahead;
  the difference is reported whatever it is.

    RATIO search_minus_train_pt_<ARM>: (search test accuracy - train test accuracy) in points

All runs share one private Ray session, one after the other, so none competes with another for the
cores. Data: --prep, else the shared CelebA sample (../shared/data/celeba-sample) prepped here at
--image-size with an identity split 0.8/0.1/0.1 (a few minutes, done once per scratch folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import REPO, machine_info, private_ray, str_list, write_json

SHARED_SAMPLE = REPO.parent / "shared" / "data" / "celeba-sample"
GOALS = {
    "A": "goal >= -0.5, exactly 0.00 when kept at full length under --deterministic",
    "B": "goal >= +3.0 with McNemar p < 0.05",
    "C": "goal > 0",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", help="registry model (default resnet18)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every train and final run (default 12)")
    parser.add_argument(
        "--arms", type=str_list, default=["A", "B", "C"], help="which arms, comma-separated (default A,B,C)"
    )
    parser.add_argument("--bad-lr", type=float, default=2e-5, help="arm B's mis-set lr (default 2e-5)")
    parser.add_argument("--trials", type=int, default=8, help="most screening trials per search (default 8)")
    parser.add_argument(
        "--no-deterministic",
        dest="deterministic",
        action="store_false",
        help="let kernels and trial order vary (default: --deterministic runs)",
    )
    parser.add_argument("--prep", help="an existing prep output (default: prep the shared sample)")
    parser.add_argument("--image-size", type=int, default=64, help="prep size of the shared sample (default 64)")
    parser.add_argument("--scratch", help="keep the prep and the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    return parser.parse_args()


def prep_shared(scratch: Path, image_size: int) -> Path:
    from gendertune.data_prep.config import PrepConfig
    from gendertune.data_prep.pipeline import run_prep

    out = scratch / f"prep-{image_size}"
    if not (out / "manifest.json").is_file():
        if not SHARED_SAMPLE.is_dir():
            raise SystemExit(f"{SHARED_SAMPLE} is not here: pass --prep DIR")
        run_prep(
            PrepConfig.from_dict(
                {
                    "data": str(SHARED_SAMPLE),
                    "labels": str(SHARED_SAMPLE / "gender_classification.csv"),
                    "out": str(out),
                    "image_size": image_size,
                    "split": "identity",
                    "ratios": [0.8, 0.1, 0.1],
                }
            )
        )
    return out


def test_correct(run_dir: Path) -> np.ndarray:
    predictions = pd.read_csv(run_dir / "test_predictions.csv", dtype={"image_id": str}).sort_values("image_id")
    return ((predictions["prob_positive"] >= 0.5).astype(int) == predictions["label"]).to_numpy()


def timed_train(prep: Path, out: Path, settings: dict) -> tuple[dict, float]:
    from gendertune.tuning.train.config import TrainConfig
    from gendertune.tuning.train.run import run_training

    started = time.perf_counter()
    metrics = run_training(TrainConfig.from_dict({"data": str(prep), "out": str(out), **settings}))
    return metrics, time.perf_counter() - started


def timed_compare(
    prep: Path, out: Path, model: str, settings: dict, *, budget: float, trials: int
) -> tuple[dict, float]:
    from gendertune.tuning.compare.config import CompareConfig
    from gendertune.tuning.compare.run import run_compare
    from gendertune.tuning.search.config import SearchConfig
    from gendertune.tuning.train.config import TrainConfig

    started = time.perf_counter()
    table = run_compare(
        CompareConfig.from_dict({"data": str(prep), "out": str(out), "models": [model]}),
        SearchConfig.from_dict({"trials": trials, "time_budget_s": budget}),
        TrainConfig.from_dict({"data": str(prep), "out": str(out), **settings}),
    )
    seconds = time.perf_counter() - started
    row = table[table["kind"] == "model"].iloc[0]
    if row["status"] != "ok":
        raise SystemExit(f"the search failed: {row['error']}")
    return row.to_dict(), seconds


def main() -> None:
    args = parse_args()
    from gendertune.tuning.evaluate.metrics import mcnemar_test

    report = {
        "benchmark": "search_vs_train",
        "machine": machine_info(),
        "model": args.model,
        "epochs": args.epochs,
        "deterministic": args.deterministic,
        "arms": {},
    }
    defaults = {"model": args.model, "epochs": args.epochs, "deterministic": args.deterministic}
    lines = []
    with tempfile.TemporaryDirectory(prefix="gendertune-bench-svt-") as tmp:
        scratch = Path(args.scratch or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        with private_ray(Path(tmp)):
            prep = Path(args.prep) if args.prep else prep_shared(scratch, args.image_size)
            report["data"] = str(prep)
            trains = {}
            for arm in args.arms:
                settings = {**defaults, "lr": args.bad_lr} if arm == "B" else defaults
                baseline = "B" if arm == "B" else "A"
                if baseline not in trains:
                    trains[baseline] = timed_train(prep, scratch / f"train-{baseline}", settings)
                    metrics, seconds = trains[baseline]
                    print(
                        f"[{arm}] train ({json.dumps(settings)}): test {metrics['accuracy']:.4f} in {seconds:.0f} s",
                        flush=True,
                    )
                trained, seconds = trains[baseline]
                budget = seconds * (2 if arm == "C" else 1)
                row, compare_s = timed_compare(
                    prep, scratch / f"compare-{arm}", args.model, settings, budget=budget, trials=args.trials
                )
                run_dir = scratch / f"compare-{arm}" / "models" / args.model
                summary = json.loads((run_dir / "search.json").read_text())
                p = mcnemar_test(test_correct(scratch / f"train-{baseline}"), test_correct(run_dir))["p_value"]
                difference = 100 * (row["accuracy"] - trained["accuracy"])
                report["arms"][arm] = {
                    "budget_s": budget,
                    "train_accuracy": trained["accuracy"],
                    "search_accuracy": row["accuracy"],
                    "difference_pt": difference,
                    "mcnemar_p": p,
                    "compare_seconds": compare_s,
                    "regime": summary["plan"]["regime"],
                    "kept": summary["kept"],
                    "verdict": summary["verdict"],
                    "final_epochs": summary["final_epochs"],
                    "trials": len(summary["trials"]),
                    "lr_suggestion": (summary.get("lr_curve") or {}).get("suggestion"),
                    "actual_s": summary["actual_s"],
                    "planned_s": summary["plan"]["planned_s"],
                }
                print(
                    f"[{arm}] compare (--time-budget-s {budget:.0f}): test {row['accuracy']:.4f} in {compare_s:.0f} s; "
                    f"{summary['plan']['regime']}, {'kept' if summary['kept'] else 'replaced'}, final "
                    f"{summary['final_epochs']} epochs; {summary['verdict']}",
                    flush=True,
                )
                lines.append(f"RATIO search_minus_train_pt_{arm}: {difference:+.2f} (McNemar p {p:.3f}; {GOALS[arm]})")
                write_json(args.json, report)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
