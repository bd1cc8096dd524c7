"""Score a `gendertune predict --faces largest` CSV against a labelled folder's CSV, per class and group.

    python bench/domain_check.py PREDICTIONS.csv LABELS.csv [--attribute Male] [--groups race,age]

Prints accuracy (95% CI), recall per class, and accuracy per value of each group column (numeric
columns in age bands). An image whose prediction failed (no face found, unreadable) counts as
wrong, so a detector that skips hard photos cannot look better for it. Used for the cross-domain
check on ../shared/data/utkface-dev (see docs/design.md's Face alignment section; the results are in docs/results.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

AGE_BANDS = [18, 30, 45, 60, 200]


def score(predictions: pd.DataFrame, labels: pd.DataFrame, *, attribute: str, groups: list[str]) -> list[str]:
    prob = next(c for c in predictions.columns if c.startswith("prob_"))
    first = predictions.assign(image_id=predictions["image"].map(lambda p: Path(p).name)).drop_duplicates("image_id")
    merged = labels.merge(first[["image_id", prob, "error"]], on="image_id", how="left")
    truth = merged[attribute].to_numpy()
    predicted = np.where(merged[prob].isna(), -1, (merged[prob] >= 0.5).astype(int))
    correct = predicted == truth
    n, k = len(correct), int(correct.sum())
    half = 1.96 * np.sqrt(correct.mean() * (1 - correct.mean()) / n)
    lines = [
        f"images {n}, accuracy {k / n:.4f} (95% CI {k / n - half:.4f}-{k / n + half:.4f}), "
        f"majority rate {max(truth.mean(), 1 - truth.mean()):.4f}, no prediction {int((predicted < 0).sum())}"
    ]
    for value in (0, 1):
        lines.append(
            f"  recall {attribute}={value}: {correct[truth == value].mean():.4f} (n={int((truth == value).sum())})"
        )
    for column in groups:
        values = merged[column]
        if pd.api.types.is_numeric_dtype(values):
            values = pd.cut(values, AGE_BANDS, right=False).astype(str)
        for value, mask in sorted((v, (values == v).to_numpy()) for v in values.unique()):
            lines.append(f"  {column}={value}: accuracy {correct[mask].mean():.4f} (n={int(mask.sum())})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions")
    parser.add_argument("labels")
    parser.add_argument("--attribute", default="Male")
    parser.add_argument("--groups", default="race,age")
    args = parser.parse_args()
    lines = score(
        pd.read_csv(args.predictions, keep_default_na=False, na_values=[""]),
        pd.read_csv(args.labels),
        attribute=args.attribute,
        groups=[g for g in args.groups.split(",") if g],
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
