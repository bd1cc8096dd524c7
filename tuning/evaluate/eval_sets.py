"""Evaluation sets besides the test split: labelled folders of photos a trained run is scored on.

    --eval-set NAME=DIR     DIR holds one CSV (labels.csv when there are several) with an image
                            column and the run's attribute (0/1 or -1/1), plus any other columns,
                            which become slices (age, race, ...); images are found in DIR or
                            DIR/images by the names in the CSV

Each image goes through exactly what `gendertune predict --faces largest` does (the run's face
detection, alignment, resize and normalisation, and its fitted temperature), after training,
never during selection. A set is checked when it is named (CSV, columns, every file present),
before any training starts. Results land in the run folder: `eval_<NAME>_predictions.csv`, and
metrics.json's `eval_sets[NAME]` and `slices[NAME]`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from gendertune.base.config import ConfigError
from gendertune.base.plots import plot_mistakes
from gendertune.cluster.storage import write_json_atomic, write_text_atomic
from gendertune.data_prep.labels import read_label_csv, read_slice_columns
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.metrics import evaluate_predictions, most_confident_mistakes
from gendertune.tuning.evaluate.predict import RunModel, predict
from gendertune.tuning.evaluate.slices import slices_of

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")  # it becomes a column and a file name
# The run's own splits name its files (mistakes_test.png) and metrics (slices.test): a set named
# like one would replace them. Compared lower-case, as a case-insensitive filesystem would.
RESERVED_NAMES = ("train", "val", "test")
LABEL_FILE = "labels.csv"
IMAGE_FOLDERS = ("", "images")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    name: str
    root: str
    table: pd.DataFrame  # image_id, path, label, then the slice columns

    @property
    def slice_columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in ("image_id", "path", "label")]


def parse_spec(text: str) -> tuple[str, str]:
    """`NAME=DIR` -> (name, dir), with the name usable as a leaderboard column."""
    name, separator, folder = text.partition("=")
    if not separator or not folder or not NAME_PATTERN.match(name):
        raise ConfigError(
            f"--eval-set {text!r}: expected NAME=DIR with NAME a letter then letters, digits or _ "
            "(e.g. utkface=../data/utkface)"
        )
    if name.lower() in RESERVED_NAMES:
        raise ConfigError(
            f"--eval-set {text!r}: {name} is the name of one of the run's own splits, whose results it "
            f"would overwrite; use another name (not {', '.join(RESERVED_NAMES)})"
        )
    return name, folder


def label_file(folder: Path) -> Path:
    if not folder.is_dir():
        raise ConfigError(f"eval set folder {folder} does not exist")
    if (folder / LABEL_FILE).is_file():
        return folder / LABEL_FILE
    csvs = sorted(folder.glob("*.csv"))
    if len(csvs) != 1:
        raise ConfigError(
            f"eval set {folder}: found {len(csvs)} CSV files and no {LABEL_FILE}; "
            f"put the labels in {folder / LABEL_FILE}"
        )
    return csvs[0]


def load_eval_set(spec: str, *, attribute: str) -> EvalSet:
    """Read and check one `NAME=DIR` set; every error names the file and what to do."""
    name, folder = parse_spec(spec)
    root = Path(folder).absolute()
    labels_path = label_file(root)
    labels = read_label_csv(labels_path, attribute)  # column and value checks, with clear errors
    groups = read_slice_columns(labels_path, attribute)
    first = labels["image_id"].iloc[0]
    base = next((root / sub for sub in IMAGE_FOLDERS if (root / sub / first).is_file()), root)
    paths = [str(base / image_id) for image_id in labels["image_id"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(
            f"eval set {name}: {len(missing)} image(s) named in {labels_path} are missing "
            f"(e.g. {missing[0]}); fix the CSV or add the files"
        )
    table = labels.assign(path=paths).merge(groups, on="image_id", how="left")
    return EvalSet(name, str(root), table[["image_id", "path", "label", *groups.columns.drop("image_id")]])


def evaluate_run(run_dir: str | Path, eval_set: EvalSet) -> dict:
    """Score a finished run on one set; writes its predictions and gallery and adds the set to the
    run's metrics.json (rewritten atomically). Returns the set's metrics."""
    run_dir = Path(run_dir)
    run = RunModel(run_dir)
    faces = predict(str(run_dir), eval_set.table["path"].tolist(), every_face=False, with_margin=True)
    scored = eval_set.table[["image_id", "path", "label"]].merge(
        faces.rename(columns={"image": "path", run.prob_column: "prob_positive"})[
            ["path", "prob_positive", "margin", "error"]
        ],
        on="path",
        how="left",
    )
    write_text_atomic(run_dir / run_layout.eval_predictions(eval_set.name), scored.to_csv(index=False))
    probs = scored["prob_positive"].to_numpy(dtype=np.float64)
    raw = np.where(np.isnan(probs), np.nan, 1 / (1 + np.exp(-scored["margin"].to_numpy(dtype=np.float64))))
    metrics = evaluate_predictions(
        scored["label"], probs, class_names=tuple(run.class_names), prob_uncalibrated=raw, threshold=run.threshold
    )
    slices = (
        slices_of(
            scored,
            eval_set.table[["path", *eval_set.slice_columns]],
            key="path",
            class_names=run.class_names,
            threshold=run.threshold,
        )
        if eval_set.slice_columns
        else None
    )
    mistakes = most_confident_mistakes(scored, threshold=run.threshold)
    plot_mistakes(
        mistakes,
        [run.chips(Path(p).read_bytes(), every_face=False)[0].chip for p in mistakes["path"]],
        run_dir / f"mistakes_{eval_set.name}.png",
        class_names=run.class_names,
        title=f"most confident mistakes on {eval_set.name}",
    )
    stored = run_layout.read_metrics(run_dir)
    stored.setdefault("eval_sets", {})[eval_set.name] = {**metrics, "folder": eval_set.root}
    if slices:
        stored.setdefault("slices", {})[eval_set.name] = slices
    write_json_atomic(run_dir / run_layout.METRICS, stored)
    return {**metrics, "slices": slices}


def format_scores(name: str, scores: dict) -> str:
    """A few lines a person reads after `gendertune evaluate`: evaluate_run's result."""
    low, high = scores["accuracy_ci95"]
    recall = ", ".join(f"{cls} {value['recall']:.4f}" for cls, value in scores["per_class"].items())
    lines = [
        f"{name}: {scores['n']} images, accuracy {scores['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
        f"majority rate {scores['majority_rate']:.4f}, macro F1 {scores['macro_f1']:.4f}, "
        f"ECE {scores['ece'] or float('nan'):.4f} -> {scores['ece_calibrated'] or float('nan'):.4f} calibrated, "
        f"no prediction {scores['no_prediction']}",
        f"  recall: {recall}",
    ]
    if scores.get("slices") and scores["slices"]["worst_slice"]:
        report = scores["slices"]
        lines.append(
            f"  worst slice {report['worst_slice']} {report['worst_slice_acc']:.4f}; largest gap "
            f"{report['largest_gap']:.4f} ({report['largest_gap_column']}); class recall gap {report['class_recall_gap']:.4f}"
        )
    return "\n".join(lines)


def missing_sets(run_dir: str | Path, eval_sets: list[EvalSet]) -> list[EvalSet]:
    """The sets a finished run has not been scored on yet (a resumed comparison scores only those)."""
    done = json.loads((Path(run_dir) / run_layout.METRICS).read_text()).get("eval_sets", {})
    return [s for s in eval_sets if s.name not in done or done[s.name].get("folder") != s.root]
