"""The training recipe's levers, one `train` each, scored on the CelebA test split and an eval set (issue 22).

    python bench/bench_recipe.py --prep PREP --eval-set utkface=../shared/data/utkface-dev --scratch S \
        --variant defaults: --variant smoothing:label_smoothing=0.1 --variant jitter:color_jitter=0.4

Each `--variant NAME:key=value,...` is one `train` of --model for --epochs with those TrainConfig
settings on top of the defaults; `data=PREP2` trains on another prep of the same photos and split
(e.g. made with another --face-zoom), whose own test chips are scored. The first variant is the
reference (give it no settings to make it the defaults). All run with the same seed under
`--deterministic`, so two runs differ by their settings and by nothing else the seed controls. A run
already finished in S/NAME is scored again, not retrained (the way to stop and go on). Each run is scored Ray-free on the same faces: the prep's
test split and each eval set (faces found and aligned as `predict --faces largest` does, once per
prep alignment; a photo without a face counts as wrong), with its 95% Wilson CI, the women's and
men's recall, the worst group of each slice column, and McNemar's p against the reference run on
the same images. One run per variant: differences of about 2 points (the CIs' half-width) are noise.

    RATIO recipe_<NAME>_<SET>_pt: (accuracy - the reference's) in points
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import (
    eval_set_faces,
    format_table,
    machine_info,
    margins,
    private_ray,
    read_split_images,
    scores,
    use_source_tree,
    write_json,
)

use_source_tree()
from gendertune.tuning.evaluate.eval_sets import load_eval_set  # noqa: E402
from gendertune.tuning.evaluate.predict import RunModel  # noqa: E402
from gendertune.tuning.evaluate.run_layout import is_complete  # noqa: E402
from gendertune.tuning.train.config import TrainConfig  # noqa: E402


def variant(text: str) -> tuple[str, dict]:
    """`NAME:key=value,key=value` -> (NAME, settings); values are read as JSON where they parse."""
    name, _, rest = text.partition(":")
    settings = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, _, value = pair.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prep", required=True, help="a `gendertune prep` output with a test split")
    parser.add_argument("--eval-set", action="append", default=[], help="NAME=DIR, as train's --eval-set")
    parser.add_argument("--variant", action="append", type=variant, required=True, help="NAME:key=value,...")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--scratch", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    prep = Path(args.prep).absolute()
    attribute = json.loads((prep / "manifest.json").read_text())["attribute"]
    eval_sets = [load_eval_set(spec, attribute=attribute) for spec in args.eval_set]
    base = {"model": args.model, "epochs": args.epochs, "deterministic": True, "data": str(prep)}
    for _name, settings in args.variant:  # an unknown or out-of-range setting stops here, before any training
        TrainConfig.from_dict({**base, "out": str(prep.parent / "unused"), **settings})
    report = {"benchmark": "recipe", "machine": machine_info(), "prep": str(prep), "base": base, "runs": []}
    faces_by_alignment: dict[str, tuple] = {}  # alignment settings -> each eval set's (chips, found)
    reference: dict[str, np.ndarray] = {}  # each set's per-image correctness in the first run
    reference_labels: dict[str, np.ndarray] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gendertune-bench-recipe-") as tmp:
        scratch = Path(args.scratch or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        with private_ray(Path(tmp)):
            for name, settings in args.variant:
                out = scratch / name
                seconds = None
                if not is_complete(out):
                    from gendertune.tuning.train.run import run_training

                    started = time.perf_counter()
                    run_training(TrainConfig.from_dict({**base, "out": str(out), **settings}))
                    seconds = time.perf_counter() - started
                run = RunModel(out)
                # A variant may train on another prep of the same photos (`data=PREP2`, e.g. another
                # --face-zoom): same split, same order, its own chips.
                run_prep = Path(json.loads((out / "config.json").read_text())["train"]["data"])
                test_faces, test_labels = read_split_images(run_prep, "test", run.prep_image_size)
                if not np.array_equal(test_labels, reference_labels.setdefault("test", test_labels)):
                    raise SystemExit(f"{run_prep}'s test split is not {prep}'s: its runs cannot be paired")
                sets = {"test": (test_faces, test_labels, np.ones(len(test_labels), bool), pd.DataFrame())}
                key = json.dumps(run.align.to_dict() if run.align else None, sort_keys=True)
                if key not in faces_by_alignment:
                    faces_by_alignment[key] = [eval_set_faces(run, loaded.table) for loaded in eval_sets]
                for loaded, (chips, found) in zip(eval_sets, faces_by_alignment[key], strict=True):
                    groups = loaded.table[loaded.slice_columns].reset_index(drop=True)
                    sets[loaded.name] = (chips, loaded.table["label"].to_numpy(), found, groups)
                result = {"variant": name, "settings": settings, "train_s": seconds, "sets": {}}
                for set_name, (faces, labels, found, groups) in sets.items():
                    predicted = np.full(len(labels), -1)
                    predicted[found] = (margins(run, faces) >= 0).astype(int)  # the fixed 0.5 threshold
                    correct = predicted == labels
                    reference.setdefault(set_name, correct)
                    row = scores(set_name, labels, correct, reference[set_name], groups)
                    result["sets"][set_name] = row
                    rows.append([name, *row.values()])
                report["runs"].append(result)
                write_json(args.json, report)
                print(f"[{name}] {json.dumps(result, default=str)}", flush=True)
    headers = ["variant", "set", "accuracy", "95% CI", "recall 0", "recall 1", "p vs ref", "worst groups"]
    print(format_table(headers, [[*r[:7], " ".join(str(v) for v in r[7:])] for r in rows]))
    first = report["runs"][0]["sets"]
    for result in report["runs"][1:]:
        for set_name, row in result["sets"].items():
            difference = 100 * (row["accuracy"] - first[set_name]["accuracy"])
            print(
                f"RATIO recipe_{result['variant']}_{set_name}_pt: {difference:+.2f} "
                f"(McNemar p {row['mcnemar_p_vs_run']:.3f}; goal: utkface >= 90% with test not lower)"
            )


if __name__ == "__main__":
    main()
