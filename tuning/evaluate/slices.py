"""Accuracy per group of people: slices of an evaluated set, and the gaps between them (pure, no Ray).

A slice is one value of a metadata column (CelebA's Eyeglasses=yes, UTKFace's race=asian, an age
band). Per slice and per slice x class: count, accuracy with a 95% Wilson interval, recall. The
summary names the worst slice, the largest gap between two slices of one column, and the gap in
recall between the two classes over the whole set (the equal-opportunity difference), the way the
Gender Shades and FairFace studies report gender classifiers. A slice with fewer than
`MIN_SLICE_IMAGES` images is reported but marked unranked: its interval is too wide to say which
group is worse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from gendertune.tuning.evaluate.metrics import wilson_ci

MIN_SLICE_IMAGES = 30
# Numeric columns with more distinct values than this are binned; fewer are categories already.
MAX_CATEGORIES = 12
AGE_BANDS = (0, 18, 30, 45, 60, 200)  # the bands face-analysis studies report (FairFace-like)


def slice_labels(values: pd.Series) -> pd.Series:
    """Values as slice names: categories as they are; a numeric column with many values in bands
    (an `age` column in the usual age bands, anything else in quartiles). Missing stays NaN."""
    numeric = pd.to_numeric(values, errors="coerce")
    present = values.notna() & (values.astype(str).str.strip() != "")
    if not (numeric.notna() == present).all() or numeric.nunique() <= MAX_CATEGORIES:
        return values.where(present).astype("object").map(lambda v: v if pd.isna(v) else str(v))
    if values.name is not None and str(values.name).lower() == "age":
        edges = list(AGE_BANDS)
        names = [f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+" for lo, hi in zip(edges, edges[1:])]
        return pd.cut(numeric, edges, right=False, labels=names).astype("object")
    bands = pd.qcut(numeric, 4, duplicates="drop")
    return bands.map(lambda b: f"{b.left:g}-{b.right:g}" if pd.notna(b) else b).astype("object")


def slice_report(
    labels: Sequence[int],
    prob_positive: Sequence[float],
    groups: pd.DataFrame,
    *,
    class_names: Sequence[str],
    min_images: int = MIN_SLICE_IMAGES,
    threshold: float = 0.5,
) -> dict:
    """Per-slice metrics of one evaluated set; `groups` has one row per prediction, a column per
    slice variable. NaN probabilities (no prediction) count as wrong, as in evaluate_predictions;
    class 1 is predicted where the probability reaches `threshold`."""
    truth = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(prob_positive, dtype=np.float64)
    predicted = np.where(np.isnan(probs), -1, probs >= threshold)
    correct = predicted == truth
    recall = {name: _share(correct[truth == value]) for value, name in enumerate(class_names)}
    rows = []
    for column in groups.columns:
        names = slice_labels(groups[column].reset_index(drop=True))
        for value in sorted(names.dropna().unique(), key=str):
            mask = (names == value).to_numpy()
            n, k = int(mask.sum()), int(correct[mask].sum())
            rows.append(
                {
                    "column": str(column),
                    "value": str(value),
                    "n": n,
                    "accuracy": k / n,
                    "ci95": list(wilson_ci(k, n)),
                    "recall": {name: _share(correct[mask & (truth == i)]) for i, name in enumerate(class_names)},
                    "class_counts": {name: int((mask & (truth == i)).sum()) for i, name in enumerate(class_names)},
                    "ranked": n >= min_images,
                }
            )
    ranked = [row for row in rows if row["ranked"]]
    worst = min(ranked, key=lambda row: row["accuracy"], default=None)
    gaps = {}
    for row in ranked:
        low, high = gaps.get(row["column"], (row["accuracy"], row["accuracy"]))
        gaps[row["column"]] = (min(low, row["accuracy"]), max(high, row["accuracy"]))
    widest = max(gaps.items(), key=lambda item: item[1][1] - item[1][0], default=None)
    recalls = [r for r in recall.values() if r is not None]
    return {
        "slices": rows,
        "min_images": min_images,
        "recall": recall,
        "worst_slice": f"{worst['column']}={worst['value']}" if worst else None,
        "worst_slice_acc": worst["accuracy"] if worst else None,
        "largest_gap": widest[1][1] - widest[1][0] if widest else None,
        "largest_gap_column": widest[0] if widest else None,
        "class_recall_gap": max(recalls) - min(recalls) if len(recalls) == 2 else None,
    }


def slices_of(
    scored: pd.DataFrame, groups: pd.DataFrame, *, key: str, class_names: Sequence[str], threshold: float = 0.5
) -> dict:
    """slice_report of predictions (columns `key`, label, prob_positive) with their groups, a
    table of `key` and one column per slice variable, looked up by `key`."""
    looked_up = scored[[key]].merge(groups, on=key, how="left").drop(columns=key)
    return slice_report(
        scored["label"], scored["prob_positive"], looked_up, class_names=class_names, threshold=threshold
    )


def _share(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if hits.size else None
