"""The ensemble row: the mean of the best models' calibrated probabilities, scored like a model.

Members are the top `k` models, or by default every model whose test accuracy lies inside the
leader's 95% CI (the ones the test cannot tell apart from it). The ensemble is scored on the same
test images and eval sets as its members, from the predictions they already wrote: no model runs
again. Its inference cost is all its members' together. Written as a run-like folder
(OUT/ensemble/: test_predictions.csv, eval_<NAME>_predictions.csv, metrics.json) so the
leaderboard's paired tests and the report read it like any model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gendertune.cluster.storage import write_json_atomic, write_text_atomic
from gendertune.tuning.compare import layout
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.metrics import evaluate_predictions
from gendertune.tuning.evaluate.slices import slices_of

FOLDER = layout.ENSEMBLE


def choose_members(ranked: pd.DataFrame, k: int) -> list[str]:
    """Models of an ensemble from a ranked leaderboard: the top k (k >= 2), or with k = 0 those
    within the leader's CI. Fewer than two: no ensemble."""
    ok = ranked[(ranked["status"] == "ok")]
    if ok.empty:
        return []
    members = ok.head(k) if k else ok[ok["accuracy"] >= ok.iloc[0]["ci95_low"]]
    return members["model"].tolist() if len(members) >= 2 else []


def mean_probability(run_dirs: list[str], file: str, key: str) -> pd.DataFrame:
    """Members' predictions in `file`, joined on `key`: label and the mean prob_positive. An image
    a member gave no prediction stays without one (NaN), as it would in use."""
    joined = None
    for index, run_dir in enumerate(run_dirs):
        table = pd.read_csv(Path(run_dir) / file, dtype={key: str})[[key, "label", "prob_positive"]]
        table = table.rename(columns={"prob_positive": f"p{index}"})
        joined = table if joined is None else joined.merge(table.drop(columns="label"), on=key, how="inner")
    probs = joined[[f"p{i}" for i in range(len(run_dirs))]]
    return pd.DataFrame({key: joined[key], "label": joined["label"], "prob_positive": probs.mean(axis=1, skipna=False)})


def write_ensemble(
    out: Path,
    members: pd.DataFrame,
    *,
    class_names: list[str],
    eval_sets: list[str],
    test_groups: pd.DataFrame | None,
    eval_groups: dict[str, pd.DataFrame],
) -> dict:
    """Score the ensemble of `members` (leaderboard rows with a local run_dir) into out/ensemble;
    returns its metrics, in metrics.json's form."""
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    run_dirs = members["run_dir"].tolist()
    test = mean_probability(run_dirs, run_layout.PREDICTIONS, "image_id")
    write_text_atomic(folder / run_layout.PREDICTIONS, test.to_csv(index=False))
    metrics = _score(test, class_names)
    if test_groups is not None:
        metrics["slices"] = {"test": slices_of(test, test_groups, key="image_id", class_names=class_names)}
    metrics["eval_sets"] = {}
    for name in eval_sets:
        scored = mean_probability(run_dirs, run_layout.eval_predictions(name), "path")
        write_text_atomic(folder / run_layout.eval_predictions(name), scored.to_csv(index=False))
        metrics["eval_sets"][name] = _score(scored, class_names)
        if name in eval_groups:
            metrics.setdefault("slices", {})[name] = slices_of(
                scored, eval_groups[name], key="path", class_names=class_names
            )
    metrics.update(
        {
            "members": members["model"].tolist(),
            "params": int(members["params"].sum()),
            # Every member looks at every image: the times add up.
            "inference_images_per_s": float(1 / (1 / members["inference_images_per_s"]).sum()),
        }
    )
    write_json_atomic(folder / run_layout.METRICS, metrics)
    return metrics


def _score(table: pd.DataFrame, class_names: list[str]) -> dict:
    # The members' probabilities were calibrated already; the mean is what the ensemble outputs.
    return evaluate_predictions(
        table["label"], table["prob_positive"].to_numpy(dtype=np.float64), class_names=tuple(class_names)
    )
