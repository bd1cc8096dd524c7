"""Flip test-time augmentation and the validation-chosen threshold, measured on one trained run's weights.

    python bench/bench_decision.py RUN --eval-set utkface=../shared/data/utkface-dev [--json OUT]

The run's network, without retraining, decides four ways: test-time augmentation none or flip
(gendertune.tuning.evaluate.decision.FlipAveraged) x threshold fixed (0.5) or balanced (fitted on
the prep's validation split by `fit_threshold`, as `train --threshold balanced` does). Each way is
scored on the prep's test split and on every eval set (faces found and aligned as `predict
--faces largest` does; a photo without a face counts as wrong): accuracy with its 95% Wilson CI,
each class's recall, the worst group of each slice column, and McNemar's p against the run's own
way. One network, so the differences are the decision's alone, not another training run's luck.
Thresholds compare logit margins (a temperature does not move a decision at a threshold fitted in
the same units). Ray is not needed; the run's prep output must have a val split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import (
    eval_set_faces,
    format_table,
    machine_info,
    margins,
    read_split_images,
    scores,
    use_source_tree,
    write_json,
)
from scipy.special import expit

use_source_tree()
from gendertune.tuning.evaluate.decision import fit_threshold, with_tta  # noqa: E402
from gendertune.tuning.evaluate.eval_sets import load_eval_set  # noqa: E402
from gendertune.tuning.evaluate.predict import RunModel  # noqa: E402

WAYS = [("none", "fixed"), ("none", "balanced"), ("flip", "fixed"), ("flip", "balanced")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished `gendertune train` run folder")
    parser.add_argument("--eval-set", action="append", default=[], help="NAME=DIR, as train's --eval-set")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    run = RunModel(Path(args.run))
    if run.tta != "none":
        raise SystemExit(f"{args.run} was trained with --tta {run.tta}; this compares against a run without it")
    network = run.model
    prep = Path(json.loads((Path(args.run) / "config.json").read_text())["train"]["data"])
    size = run.prep_image_size
    sets = {}
    for split in ("val", "test"):
        faces, labels = read_split_images(prep, split, size)
        sets[split] = (faces, labels, np.ones(len(labels), bool), pd.DataFrame(index=range(len(labels))))
    for spec in args.eval_set:
        loaded = load_eval_set(spec, attribute=json.loads((prep / "manifest.json").read_text())["attribute"])
        faces, found = eval_set_faces(run, loaded.table)
        groups = loaded.table[loaded.slice_columns].reset_index(drop=True)
        sets[loaded.name] = (faces, loaded.table["label"].to_numpy(), found, groups)
    by_tta = {}
    for tta in ("none", "flip"):
        run.model = with_tta(network, tta)
        by_tta[tta] = {name: margins(run, faces) for name, (faces, *_rest) in sets.items()}
    rows, reference = [], {}
    for tta, rule in WAYS:
        threshold = fit_threshold(sets["val"][1], expit(by_tta[tta]["val"]), rule)
        for name, (_faces, labels, found, groups) in sets.items():
            if name == "val":
                continue
            predicted = np.full(len(labels), -1)
            predicted[found] = (expit(by_tta[tta][name]) >= threshold).astype(int)
            correct = predicted == labels
            reference.setdefault(name, correct)
            rows.append(
                {
                    "tta": tta,
                    "threshold": f"{rule} ({threshold:.3f})",
                    **scores(name, labels, correct, reference[name], groups),
                }
            )
    table = pd.DataFrame(rows).fillna("")  # the test split has no slice columns
    print(
        format_table(
            list(table.columns), [[f"{v:.4f}" if isinstance(v, float) else v for v in r] for r in table.values]
        )
    )
    write_json(args.json, {"machine": machine_info(), "run": args.run, "rows": rows})


if __name__ == "__main__":
    main()
