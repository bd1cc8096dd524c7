"""The comparison leaderboard: flat rows, sorted, with a paired test of each model vs the leader.

A row per model (timm-style): rank, test accuracy with its 95% CI, per-class precision/recall/F1,
macro F1, ROC-AUC, ECE, params, train time, inference speed, trials run/pruned, the best
hyperparameters, and McNemar's test against the leader on the *same* test images — the seed
reported 98 vs 95 vs 94 vs 92 on 1,000 images without asking whether those gaps are real. A model
that failed is a row with its error, ranked last.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cluster import object_store
from cluster.storage import write_json_atomic, write_text_atomic
from tuning import run_layout
from tuning.metrics import mcnemar_test
from tuning.plots import plot_accuracy_vs_speed, plot_accuracy_with_ci, plot_confusion_matrices, plot_histories

CSV, JSON, MD = "leaderboard.csv", "leaderboard.json", "leaderboard.md"
COLUMNS = [
    "rank", "model", "status", "accuracy", "ci95_low", "ci95_high", "majority_rate", "macro_f1", "roc_auc", "ece",
    "precision_Female", "recall_Female", "f1_Female", "precision_Male", "recall_Male", "f1_Male",
    "params", "train_seconds", "inference_images_per_s", "trials_run", "trials_pruned", "best_epoch",
    "best_val_acc", "mcnemar_p_vs_leader", "mcnemar_b", "mcnemar_c", "test_images", "best_params", "run_dir", "error",
]


def model_row(model: str, metrics: dict, *, trials_run: int, trials_pruned: int, best_params: str, run_dir: str) -> dict:
    row = {
        "model": model, "status": "ok", "accuracy": metrics["accuracy"],
        "ci95_low": metrics["accuracy_ci95"][0], "ci95_high": metrics["accuracy_ci95"][1],
        "majority_rate": metrics["majority_rate"], "macro_f1": metrics["macro_f1"], "roc_auc": metrics["roc_auc"],
        "ece": metrics["ece"], "params": metrics["params"], "train_seconds": metrics["wall_seconds"],
        "inference_images_per_s": metrics["inference_images_per_s"], "trials_run": trials_run,
        "trials_pruned": trials_pruned, "best_epoch": metrics["best_epoch"], "best_val_acc": metrics["best_val_acc"],
        "test_images": metrics["n"], "best_params": best_params, "run_dir": run_dir, "error": "",
    }
    for name, scores in metrics["per_class"].items():
        for key in ("precision", "recall", "f1"):
            row[f"{key}_{name}"] = scores[key]
    return row


def error_row(model: str, error: BaseException | str) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {"model": model, "status": "error", "error": f"{type(error).__name__}: {message}"[:500]
            if isinstance(error, BaseException) else message}


def rank_rows(rows: list[dict]) -> pd.DataFrame:
    """Sort by accuracy (ties: macro F1), errors last; add McNemar vs the leader."""
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    table["_ok"] = table["status"] == "ok"
    table = table.sort_values(["_ok", "accuracy", "macro_f1"], ascending=[False, False, False], kind="stable")
    table = table.drop(columns="_ok").reset_index(drop=True)
    table["rank"] = np.where(table["status"] == "ok", np.arange(1, len(table) + 1), np.nan)
    ok = table[table["status"] == "ok"]
    if len(ok):
        leader = _correctness(ok.iloc[0]["run_dir"])
        for index, row in ok.iloc[1:].iterrows():
            other = _correctness(row["run_dir"])
            joined = leader.join(other, lsuffix="_leader", how="inner")
            test = mcnemar_test(joined["correct_leader"].to_numpy(), joined["correct"].to_numpy())
            table.loc[index, ["mcnemar_p_vs_leader", "mcnemar_b", "mcnemar_c"]] = [test["p_value"], test["b"], test["c"]]
    return table


def _correctness(run_dir: str) -> pd.DataFrame:
    predictions = pd.read_csv(Path(run_dir) / run_layout.PREDICTIONS, dtype={"image_id": str}).set_index("image_id")
    return pd.DataFrame({"correct": (predictions["prob_positive"] >= 0.5).astype(int) == predictions["label"]})


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| rank | model | test accuracy (95% CI) | macro F1 | ROC-AUC | ECE | params | inference img/s | trials (pruned) | McNemar p vs #1 |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for _, row in table.iterrows():
        if row["status"] != "ok":
            lines.append(f"| – | {row['model']} | error: {row['error']} | | | | | | | |")
            continue
        p_value = "leader" if row["rank"] == 1 else f"{row['mcnemar_p_vs_leader']:.3g}"
        lines.append(
            f"| {int(row['rank'])} | {row['model']} | {row['accuracy']:.4f} ({row['ci95_low']:.4f}–{row['ci95_high']:.4f}) "
            f"| {row['macro_f1']:.4f} | {_fmt(row['roc_auc'])} | {row['ece']:.4f} | {row['params'] / 1e6:.1f}M "
            f"| {row['inference_images_per_s']:.0f} | {int(row['trials_run'])} ({int(row['trials_pruned'])}) | {p_value} |"
        )
    ok = table[table["status"] == "ok"]
    if len(ok):
        lines += ["", f"Test images: {int(ok.iloc[0]['test_images'])}; majority-class rate {ok.iloc[0]['majority_rate']:.4f}. "
                  "McNemar's test compares each model with the leader on the same images; p ≥ 0.05 means the gap "
                  "may well be chance."]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4f}"


def write_leaderboard(table: pd.DataFrame, out: Path, histories: dict[str, pd.DataFrame], confusion: dict) -> None:
    write_text_atomic(out / CSV, table.to_csv(index=False))
    write_json_atomic(out / JSON, json.loads(table.to_json(orient="records")))
    write_text_atomic(out / MD, to_markdown(table))
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return
    records = ok.rename(columns={"ci95_low": "ci_lo", "ci95_high": "ci_hi", "inference_images_per_s": "images_per_s"}).to_dict("records")
    plot_accuracy_with_ci(records, out / "accuracy_ci.png")
    plot_confusion_matrices(confusion, out / "confusion_matrices.png")
    plot_histories(histories, out / "accuracy_per_epoch.png")
    plot_accuracy_vs_speed(records, out / "accuracy_vs_speed.png")


def read_leaderboard(out: str | Path) -> pd.DataFrame:
    """The leaderboard in `out`, a folder or an object-store URI."""
    path = object_store.join(out, CSV)
    if not object_store.is_file(path):
        raise FileNotFoundError(f"{out} has no {CSV}; run `gendertune compare --out {out}` first")
    return pd.read_csv(io.BytesIO(object_store.read_bytes(path)), keep_default_na=False, na_values=[""])


def format_table(table: pd.DataFrame) -> str:
    columns = ["rank", "model", "status", "accuracy", "ci95_low", "ci95_high", "macro_f1", "roc_auc", "ece",
               "params", "inference_images_per_s", "trials_run", "trials_pruned", "mcnemar_p_vs_leader", "error"]
    shown = table[columns].astype({"rank": "Int64", "params": "Int64", "trials_run": "Int64", "trials_pruned": "Int64"})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")
