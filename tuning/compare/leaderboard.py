"""The comparison leaderboard: flat rows, sorted, with a paired test of each model vs the leader.

A row per model (timm-style): rank, test accuracy with its 95% CI, per-class precision/recall/F1,
macro F1, ROC-AUC, ECE before and after temperature scaling, the worst slice of the test split
and the gap between the classes' recall, params, train time, inference speed, trials run/pruned,
the best hyperparameters, per eval set its accuracy with CI (acc_<NAME>...), and McNemar's test
against the leader on the *same* images — the original notebook reported 98 vs 95 vs 94 vs 92 on 1,000 images
without asking whether those gaps are real. The ensemble row follows the ranked models; a model
that failed is a row with its error, ranked last.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gendertune.base.errors import MissingInputError, UserInputError
from gendertune.base.plots import (
    plot_accuracy_vs_speed,
    plot_accuracy_with_ci,
    plot_confusion_matrices,
    plot_histories,
    plot_reliability,
    plot_slice_accuracy,
)
from gendertune.cluster import storage
from gendertune.cluster.environment import write_environment
from gendertune.cluster.storage import write_json_atomic, write_text_atomic
from gendertune.models.registry import get_spec
from gendertune.tuning.compare import layout
from gendertune.tuning.compare.layout import CSV, JSON, MD  # noqa: F401  (re-exported: readers name them here)
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.metrics import mcnemar_test

# Fixed columns; per-class columns (named after the prep's classes) and per-eval-set columns
# (acc_<NAME>, ...) come after them, in the order the rows name them.
COLUMNS = [
    "rank",
    "model",
    "kind",
    "status",
    "accuracy",
    "ci95_low",
    "ci95_high",
    "majority_rate",
    "macro_f1",
    "roc_auc",
    "ece",
    "ece_calibrated",
    "temperature",
    "worst_slice",
    "worst_slice_acc",
    "class_recall_gap",
    "params",
    "train_seconds",
    "search_seconds",
    "inference_images_per_s",
    "trials_run",
    "trials_pruned",
    "best_epoch",
    "best_val_acc",
    "user_config",
    "val_gain_vs_user",
    "final_epochs",
    "epochs_asked",
    "mcnemar_p_vs_leader",
    "mcnemar_b",
    "mcnemar_c",
    "test_images",
    "best_params",
]
LAST_COLUMNS = ["members", "note", "run_dir", "error"]
# The columns each eval set NAME adds ({} = NAME), besides recall_<Class>_NAME: metric_columns and
# _test_against_leader write them, report.py lays out its per-set tables by them.
EVAL_SET_COLUMNS = (
    "acc_{}",
    "acc_{}_ci95_low",
    "acc_{}_ci95_high",
    "macro_f1_{}",
    "ece_calibrated_{}",
    "worst_slice_{}",
    "worst_slice_acc_{}",
    "class_recall_gap_{}",
    "mcnemar_p_vs_leader_{}",
)
# What every leaderboard has had, old ones included (readers fill in the rest): a CSV without
# them is not one.
REQUIRED_COLUMNS = ["rank", "model", "status", "accuracy", "ci95_low", "ci95_high", "error"]


def metric_columns(metrics: dict) -> dict:
    """The leaderboard's columns from one metrics.json: test metrics, calibration, slices of the
    test split, and per eval set its accuracy with CI, macro F1, ECE and worst slice."""
    row = {
        "accuracy": metrics["accuracy"],
        "ci95_low": metrics["accuracy_ci95"][0],
        "ci95_high": metrics["accuracy_ci95"][1],
        "majority_rate": metrics["majority_rate"],
        "macro_f1": metrics["macro_f1"],
        "roc_auc": metrics["roc_auc"],
        "ece": metrics["ece"],
        "ece_calibrated": metrics.get("ece_calibrated"),
        "temperature": metrics.get("temperature"),
        "params": metrics["params"],
        "inference_images_per_s": metrics["inference_images_per_s"],
        "test_images": metrics["n"],
    }
    for name, scores in metrics["per_class"].items():
        for key in ("precision", "recall", "f1"):
            row[f"{key}_{name}"] = scores[key]
    slices = metrics.get("slices", {})
    row.update(_slice_columns(slices.get("test"), ""))
    for name, scores in metrics.get("eval_sets", {}).items():
        row.update(
            {
                f"acc_{name}": scores["accuracy"],
                f"acc_{name}_ci95_low": scores["accuracy_ci95"][0],
                f"acc_{name}_ci95_high": scores["accuracy_ci95"][1],
                f"macro_f1_{name}": scores["macro_f1"],
                f"ece_calibrated_{name}": scores.get("ece_calibrated"),
            }
        )
        row.update({f"recall_{cls}_{name}": value["recall"] for cls, value in scores["per_class"].items()})
        row.update(_slice_columns(slices.get(name), f"_{name}"))
    return row


def _slice_columns(report: dict | None, suffix: str) -> dict:
    if not report:
        return {}
    return {
        f"worst_slice{suffix}": report["worst_slice"],
        f"worst_slice_acc{suffix}": report["worst_slice_acc"],
        f"class_recall_gap{suffix}": report["class_recall_gap"],
    }


def model_row(model: str, metrics: dict, *, run_dir: str, search: dict) -> dict:
    """A model's row from its metrics.json and its search.json: `train_seconds` is the chosen
    configuration's full-length run, `search_seconds` the whole search; `user_config` says whether
    the user's configuration was kept or replaced, and `val_gain_vs_user` by how many validation
    points the chosen one beat it (NaN where no challenger was compared); `final_epochs` of
    `epochs_asked` is how much of the schedule the budget held."""
    trials = search.get("trials") or []
    return {
        "model": model,
        "kind": "model",
        "status": "ok",
        **metric_columns(metrics),
        "train_seconds": search.get("final_seconds", metrics["wall_seconds"]),
        "search_seconds": sum((search.get("actual_s") or {}).values()) or float("nan"),
        "trials_run": len(trials),
        "trials_pruned": sum(t.get("status") == "pruned" for t in trials),
        "best_epoch": metrics["best_epoch"],
        "best_val_acc": metrics["best_val_acc"],
        "user_config": "kept" if search.get("kept") else "replaced",
        "val_gain_vs_user": search.get("gain", float("nan")),
        "final_epochs": search.get("final_epochs"),
        "epochs_asked": (search.get("plan") or {}).get("epochs"),
        "best_params": search.get("best_params", ""),
        "note": get_spec(model).note,
        "run_dir": run_dir,
        "error": "",
    }


def ensemble_row(metrics: dict, *, run_dir: str) -> dict:
    return {
        "model": "ensemble",
        "kind": "ensemble",
        "status": "ok",
        **metric_columns(metrics),
        "members": "+".join(metrics["members"]),
        "run_dir": run_dir,
        "error": "",
    }


def error_row(model: str, error: BaseException | str) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {
        "model": model,
        "kind": "model",
        "status": "error",
        "error": f"{type(error).__name__}: {message}"[:500] if isinstance(error, BaseException) else message,
    }


def _columns(rows: list[dict]) -> list[str]:
    extra = [key for row in rows for key in row if key not in COLUMNS and key not in LAST_COLUMNS]
    return COLUMNS + list(dict.fromkeys(extra)) + LAST_COLUMNS


def rank_rows(rows: list[dict], *, eval_sets: list[str] = ()) -> pd.DataFrame:
    """Sort the models by accuracy (ties: macro F1), errors last; add McNemar vs the leader on the
    test split and on each eval set."""
    table = pd.DataFrame(rows).reindex(columns=_columns(rows))
    ok = (table["status"] == "ok").to_numpy()
    table = (
        table.assign(_failed=~ok)
        .sort_values(["_failed", "accuracy", "macro_f1"], ascending=[True, False, False], kind="stable")
        .drop(columns="_failed")
        .reset_index(drop=True)
    )
    n_ok = int(ok.sum())
    table["rank"] = np.where(np.arange(len(table)) < n_ok, np.arange(1, len(table) + 1), np.nan)
    _test_against_leader(table, range(1, n_ok), eval_sets)
    return _last_columns_last(table)


def add_ensemble(ranked: pd.DataFrame, ensemble: dict, *, eval_sets: list[str] = ()) -> pd.DataFrame:
    """`ranked` (rank_rows) with the ensemble row after the ranked models, before the failed ones:
    unranked, and tested against the same leader."""
    n_ok = int((ranked["status"] == "ok").sum())
    table = pd.concat([ranked.iloc[:n_ok], pd.DataFrame([ensemble]), ranked.iloc[n_ok:]], ignore_index=True)
    _test_against_leader(table, [n_ok], eval_sets)
    return _last_columns_last(table)


def _test_against_leader(table: pd.DataFrame, indices, eval_sets: list[str]) -> None:
    """McNemar of each row in `indices` against row 0, the leader, on the test split and each eval set."""
    indices = list(indices)
    if not indices:
        return
    for file, key, suffix in [(run_layout.PREDICTIONS, "image_id", "")] + [
        (run_layout.eval_predictions(name), "path", f"_{name}") for name in eval_sets
    ]:
        leader = _correctness(table.loc[0, "run_dir"], file, key)
        for index in indices:
            joined = leader.join(_correctness(table.loc[index, "run_dir"], file, key), lsuffix="_leader", how="inner")
            test = mcnemar_test(joined["correct_leader"].to_numpy(), joined["correct"].to_numpy())
            table.loc[index, f"mcnemar_p_vs_leader{suffix}"] = test["p_value"]
            if not suffix:
                table.loc[index, ["mcnemar_b", "mcnemar_c"]] = [test["b"], test["c"]]


def _last_columns_last(table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in table.columns if c not in LAST_COLUMNS] + LAST_COLUMNS]


def _correctness(run_dir: str, file: str, key: str) -> pd.DataFrame:
    """Per image: was the prediction right (no prediction counts as wrong, as in the metrics)."""
    predictions = pd.read_csv(Path(run_dir) / file, dtype={key: str}).set_index(key)
    predicted = np.where(predictions["prob_positive"].isna(), -1, predictions["prob_positive"] >= 0.5)
    return pd.DataFrame({"correct": predicted == predictions["label"]}, index=predictions.index)


def eval_set_names(table: pd.DataFrame) -> list[str]:
    return [
        c[len("acc_") : -len("_ci95_low")] for c in table.columns if c.startswith("acc_") and c.endswith("_ci95_low")
    ]


def to_markdown(table: pd.DataFrame) -> str:
    sets = eval_set_names(table)
    header = [
        "rank",
        "model",
        "test accuracy (95% CI)",
        *[f"{name} accuracy (95% CI)" for name in sets],
        "macro F1",
        "ROC-AUC",
        "ECE → calibrated",
        "worst test slice",
        "class recall gap",
        "params",
        "inference img/s",
        "trials (pruned)",
        "your configuration",
        "McNemar p vs #1",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in table.iterrows():
        if row["status"] != "ok":
            lines.append(f"| – | {row['model']} | error: {row['error']} |" + " |" * (len(header) - 3))
            continue
        rank = "ens." if row["kind"] == "ensemble" else str(int(row["rank"]))
        name = f"ensemble of {row['members']}" if row["kind"] == "ensemble" else row["model"]
        p_value = "leader" if row["rank"] == 1 else _fmt(row["mcnemar_p_vs_leader"], ".3g")
        sets_cells = [
            f"{_fmt(row[f'acc_{n}'])} ({_fmt(row[f'acc_{n}_ci95_low'])}–{_fmt(row[f'acc_{n}_ci95_high'])})"
            + (
                ""
                if row["rank"] == 1 or pd.isna(row.get(f"mcnemar_p_vs_leader_{n}"))
                else f", p {row[f'mcnemar_p_vs_leader_{n}']:.3g}"
            )
            for n in sets
        ]
        worst = "n/a" if pd.isna(row["worst_slice"]) else f"{row['worst_slice']} {row['worst_slice_acc']:.4f}"
        trials = "" if pd.isna(row["trials_run"]) else f"{int(row['trials_run'])} ({int(row['trials_pruned'])})"
        user = user_config_cell(row)
        cells = [
            rank,
            name,
            f"{row['accuracy']:.4f} ({row['ci95_low']:.4f}–{row['ci95_high']:.4f})",
            *sets_cells,
            f"{row['macro_f1']:.4f}",
            _fmt(row["roc_auc"]),
            f"{_fmt(row['ece'])} → {_fmt(row['ece_calibrated'])}",
            worst,
            _fmt(row["class_recall_gap"]),
            f"{row['params'] / 1e6:.1f}M",
            f"{row['inference_images_per_s']:.0f}",
            trials,
            user,
            p_value,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ok = table[table["status"] == "ok"]
    if len(ok):
        lines += [
            "",
            f"Test images: {int(ok.iloc[0]['test_images'])}; majority-class rate {ok.iloc[0]['majority_rate']:.4f}. "
            "McNemar's test compares each model with the leader on the same images (test split, and each eval "
            "set's own p after its accuracy); p ≥ 0.05 means the gap may well be chance. The class recall gap is "
            "the difference between the two classes' recall (equal opportunity). Your configuration: kept, or "
            "replaced by a challenger that beat it on validation by more than 2 standard errors (the points "
            "are the validation difference the search saw).",
        ]
    return "\n".join(lines) + "\n"


def is_missing(value: Any) -> bool:
    """A leaderboard cell with nothing in it: None, NaN (a float or pandas' NA) or an empty string."""
    return (
        value is None
        or value is pd.NA
        or (isinstance(value, str) and not value)
        or (isinstance(value, float | np.floating) and bool(np.isnan(value)))
    )


# The columns user_config_cell reads; the report shows its column when any of them has a value.
USER_CONFIG_COLUMNS = ("user_config", "val_gain_vs_user", "final_epochs", "epochs_asked")


def user_config_cell(row: Mapping[str, Any]) -> str:
    """kept / replaced, with the validation difference the guard saw when a challenger was compared,
    and the final run's epochs when the budget held less than the schedule asked for."""
    verdict, gain, final, asked = (None if is_missing(row.get(k)) else row.get(k) for k in USER_CONFIG_COLUMNS)
    if verdict is None:
        return ""
    notes = [] if gain is None else [f"{100 * float(gain):+.1f} pt val"]
    if final is not None and asked is not None and int(final) < int(asked):
        notes.append(f"{int(final)} of {int(asked)} epochs")
    return f"{verdict} ({', '.join(notes)})" if notes else str(verdict)


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def write_leaderboard(
    table: pd.DataFrame,
    out: Path,
    histories: dict[str, pd.DataFrame],
    confusion: dict,
    slices: dict[str, dict[str, dict]],
    calibration: dict[str, pd.DataFrame],
    *,
    class_names: list[str],
) -> None:
    """The leaderboard files, then its figures; `slices` is {model: {set: slice report}},
    `calibration` {model: its test predictions}."""
    write_text_atomic(out / CSV, table.to_csv(index=False))
    write_environment(out)  # the comparison's provenance: what produced the numbers in its leaderboard
    write_json_atomic(out / JSON, json.loads(table.to_json(orient="records")))
    write_text_atomic(out / MD, to_markdown(table))
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return
    records = ok.rename(
        columns={"ci95_low": "ci_lo", "ci95_high": "ci_hi", "inference_images_per_s": "images_per_s"}
    ).to_dict("records")
    plot_accuracy_with_ci(records, out / layout.ACCURACY_CI)
    for name in eval_set_names(table):
        plot_accuracy_with_ci(
            [
                {
                    **r,
                    "accuracy": r[f"acc_{name}"],
                    "ci_lo": r[f"acc_{name}_ci95_low"],
                    "ci_hi": r[f"acc_{name}_ci95_high"],
                }
                for r in records
            ],
            out / f"eval_{name}_accuracy_ci.png",
            xlabel=f"{name} accuracy (95% CI)",
        )
    plot_confusion_matrices(confusion, out / layout.CONFUSION_MATRICES, class_names=class_names)
    plot_histories(histories, out / layout.HISTORIES)
    plot_accuracy_vs_speed(records, out / layout.ACCURACY_VS_SPEED)
    if any(slices.values()):
        plot_slice_accuracy(slices, out / layout.SLICE_ACCURACY)
    plot_reliability(calibration, out / layout.RELIABILITY)


def read_leaderboard(out: str | Path) -> pd.DataFrame:
    """The leaderboard in `out`, a folder or an object-store URI."""
    path = storage.join(out, CSV)
    if not storage.is_file(path):
        raise MissingInputError(f"{out} has no {CSV}; run `gendertune compare --out {out}` first")
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(path)), keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserInputError(
            f"{path} is not a readable CSV ({err}); re-run `gendertune compare --resume --out {out}`"
        ) from None
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise UserInputError(
            f"{path} is not a leaderboard `gendertune compare` wrote (no {', '.join(missing)}); "
            f"re-run `gendertune compare --resume --out {out}`"
        )
    return table


def format_table(table: pd.DataFrame) -> str:
    columns = [
        "rank",
        "model",
        "kind",
        "status",
        "accuracy",
        "ci95_low",
        "ci95_high",
        *[f"acc_{name}" for name in eval_set_names(table)],
        "macro_f1",
        "roc_auc",
        "ece",
        "ece_calibrated",
        "worst_slice",
        "worst_slice_acc",
        "params",
        "inference_images_per_s",
        "trials_run",
        "trials_pruned",
        "user_config",
        "val_gain_vs_user",
        "mcnemar_p_vs_leader",
        "error",
    ]
    shown = table[columns].astype({"rank": "Int64", "params": "Int64", "trials_run": "Int64", "trials_pruned": "Int64"})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")
