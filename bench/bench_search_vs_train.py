"""Does a search beat the user's own configuration at the same wall-clock budget?

Baseline: one `train` of --model with every default (plus --epochs), timed end to end (training,
held-out evaluation) as `gendertune.tuning.train.run.run_training` runs it. Then a `compare` of the same model with
`--time-budget-s` set to that measured time: Optuna + ASHA, its first trial being that same default
configuration (points_to_evaluate), the others what TPE suggests. Both are scored once on the same
test split; the difference and its McNemar p-value are printed, and

    RATIO search_minus_train_pt: (search test accuracy - train test accuracy) in points

with the goal > 0 (the search ahead). Both run in one private Ray session, one after the other,
so neither competes with the other for the cores.

Data: --prep, else the shared CelebA sample (../shared/data/celeba-sample) prepped here at
--image-size with an identity split 0.8/0.1/0.1 (a few minutes, done once per scratch folder).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchlib import REPO, machine_info, private_ray, write_json

SHARED_SAMPLE = REPO.parent / "shared" / "data" / "celeba-sample"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", help="registry model (default resnet18)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of the default train, and the search's cap (default 12)")
    parser.add_argument("--trials", type=int, default=24, help="most trials the search may start within its budget (default 24)")
    parser.add_argument("--prep", help="an existing prep output (default: prep the shared sample)")
    parser.add_argument("--image-size", type=int, default=64, help="prep size of the shared sample (default 64)")
    parser.add_argument("--scratch", help="keep the prep and both runs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    return parser.parse_args()


def prep_shared(scratch: Path, image_size: int) -> Path:
    from gendertune.data_prep.config import PrepConfig
    from gendertune.data_prep.pipeline import run_prep

    out = scratch / f"prep-{image_size}"
    if not (out / "manifest.json").is_file():
        if not SHARED_SAMPLE.is_dir():
            raise SystemExit(f"{SHARED_SAMPLE} is not here: pass --prep DIR")
        run_prep(PrepConfig.from_dict({
            "data": str(SHARED_SAMPLE), "labels": str(SHARED_SAMPLE / "gender_classification.csv"),
            "out": str(out), "image_size": image_size, "split": "identity", "ratios": [0.8, 0.1, 0.1]}))
    return out


def test_correct(run_dir: Path) -> np.ndarray:
    predictions = pd.read_csv(run_dir / "test_predictions.csv", dtype={"image_id": str}).sort_values("image_id")
    return ((predictions["prob_positive"] >= 0.5).astype(int) == predictions["label"]).to_numpy()


def main() -> None:
    args = parse_args()
    from gendertune.tuning.compare.run import run_compare
    from gendertune.tuning.compare.config import CompareConfig
    from gendertune.tuning.search.config import SearchConfig
    from gendertune.tuning.train.config import TrainConfig
    from gendertune.tuning.evaluate.metrics import mcnemar_test
    from gendertune.tuning.train.run import run_training

    report = {"benchmark": "search_vs_train", "machine": machine_info(), "model": args.model, "epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="gendertune-bench-svt-") as tmp:
        scratch = Path(args.scratch or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        with private_ray(Path(tmp)):
            prep = Path(args.prep) if args.prep else prep_shared(scratch, args.image_size)
            report["data"] = str(prep)
            train_dir = scratch / "train"
            started = time.perf_counter()
            trained = run_training(TrainConfig.from_dict({"data": str(prep), "out": str(train_dir), "model": args.model,
                                                          "epochs": args.epochs}))
            budget = time.perf_counter() - started
            print(f"train (defaults, {args.epochs} epochs): test {trained['accuracy']:.4f} in {budget:.0f} s", flush=True)
            compare_dir = scratch / "compare"
            started = time.perf_counter()
            table = run_compare(
                CompareConfig.from_dict({"data": str(prep), "out": str(compare_dir), "models": [args.model]}),
                SearchConfig.from_dict({"trials": args.trials, "time_budget_s": budget}),
                TrainConfig.from_dict({"data": str(prep), "out": str(compare_dir), "epochs": args.epochs}))
            searched_s = time.perf_counter() - started
        row = table[table["kind"] == "model"].iloc[0]
        if row["status"] != "ok":
            raise SystemExit(f"the search failed: {row['error']}")
        p = mcnemar_test(test_correct(train_dir), test_correct(compare_dir / "models" / args.model))["p_value"]
        difference = 100 * (row["accuracy"] - trained["accuracy"])
        report.update(train_accuracy=trained["accuracy"], train_seconds=budget, search_accuracy=row["accuracy"],
                      search_seconds=row["search_seconds"], compare_seconds=searched_s, trials_run=int(row["trials_run"]),
                      trials_pruned=int(row["trials_pruned"]), mcnemar_p=p, difference_pt=difference)
        write_json(args.json, report)
    print(f"search (--time-budget-s {budget:.0f}): test {row['accuracy']:.4f}, {int(row['trials_run'])} trials "
          f"({int(row['trials_pruned'])} pruned), search {row['search_seconds']:.0f} s, compare {searched_s:.0f} s in all")
    print(f"RATIO search_minus_train_pt: {difference:+.2f} (goal > 0; McNemar p {p:.3f})")


if __name__ == "__main__":
    main()
