"""The leaderboard's ranking: order, ranks, McNemar against the leader on the same images, and the
ensemble row's place, on run folders the test writes (gendertune.tuning.compare.leaderboard)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gendertune.tuning.compare import leaderboard
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.metrics import mcnemar_test

LABELS = np.array([0, 1] * 20)


def _run(tmp_path, name: str, wrong: int) -> dict:
    """A run folder whose predictions get the first `wrong` images wrong, and its leaderboard row."""
    folder = tmp_path / name
    folder.mkdir()
    probs = np.where(LABELS == 1, 0.9, 0.1)
    probs[:wrong] = 1 - probs[:wrong]
    pd.DataFrame(
        {"image_id": [f"{i:06d}.jpg" for i in range(LABELS.size)], "label": LABELS, "prob_positive": probs}
    ).to_csv(folder / run_layout.PREDICTIONS, index=False)
    accuracy = 1 - wrong / LABELS.size
    return {
        "model": name,
        "kind": "model",
        "status": "ok",
        "accuracy": accuracy,
        "macro_f1": accuracy,
        "run_dir": str(folder),
        "error": "",
    }


def test_models_are_ranked_by_accuracy_with_mcnemar_against_the_leader(tmp_path):
    rows = [
        _run(tmp_path, "weak", 12),
        leaderboard.error_row("broken", RuntimeError("out of memory")),
        _run(tmp_path, "strong", 2),
        _run(tmp_path, "middle", 6),
    ]
    table = leaderboard.rank_rows(rows)
    assert table["model"].tolist() == ["strong", "middle", "weak", "broken"]
    assert table["rank"].tolist()[:3] == [1, 2, 3] and np.isnan(table["rank"].iloc[3])
    assert table["error"].iloc[3] == "RuntimeError: out of memory"
    correct = {n: np.arange(LABELS.size) >= w for n, w in (("strong", 2), ("middle", 6), ("weak", 12))}
    for name in ("middle", "weak"):
        expected = mcnemar_test(correct["strong"], correct[name])
        row = table.set_index("model").loc[name]
        assert row["mcnemar_p_vs_leader"] == pytest.approx(expected["p_value"])
        assert (row["mcnemar_b"], row["mcnemar_c"]) == (expected["b"], expected["c"])
    assert np.isnan(table["mcnemar_p_vs_leader"].iloc[0])
    assert table.columns[-len(leaderboard.LAST_COLUMNS) :].tolist() == leaderboard.LAST_COLUMNS


def test_the_ensemble_row_follows_the_ranked_models_unranked_and_tested_against_the_leader(tmp_path):
    ranked = leaderboard.rank_rows(
        [_run(tmp_path, "strong", 2), _run(tmp_path, "weak", 12), leaderboard.error_row("broken", "failed")]
    )
    ensemble = {**_run(tmp_path, "ensemble", 4), "kind": "ensemble", "members": "strong+weak"}
    table = leaderboard.add_ensemble(ranked, ensemble)
    assert table["model"].tolist() == ["strong", "weak", "ensemble", "broken"]
    assert np.isnan(table["rank"].iloc[2]) and table["members"].iloc[2] == "strong+weak"
    expected = mcnemar_test(np.arange(LABELS.size) >= 2, np.arange(LABELS.size) >= 4)
    assert table["mcnemar_p_vs_leader"].iloc[2] == pytest.approx(expected["p_value"])
    # The models' own rows are as rank_rows left them.
    pd.testing.assert_frame_equal(table.drop(index=2).reset_index(drop=True)[ranked.columns], ranked, check_dtype=False)
    assert table.columns[-len(leaderboard.LAST_COLUMNS) :].tolist() == leaderboard.LAST_COLUMNS


def _eval_predictions(run: dict, wrong: int) -> None:
    """The run's predictions on an eval set `faces`, by path, the first `wrong` wrong."""
    probs = np.where(LABELS == 1, 0.8, 0.2)
    probs[:wrong] = 1 - probs[:wrong]
    pd.DataFrame(
        {"path": [f"/faces/{i}.jpg" for i in range(LABELS.size)], "label": LABELS, "prob_positive": probs}
    ).to_csv(f"{run['run_dir']}/{run_layout.eval_predictions('faces')}", index=False)


def test_an_eval_sets_columns_are_the_declared_ones(tmp_path):
    scores = {
        "accuracy": 0.9,
        "accuracy_ci95": [0.8, 0.95],
        "macro_f1": 0.9,
        "ece_calibrated": 0.02,
        "per_class": {"Female": {"recall": 0.9}, "Male": {"recall": 0.9}},
    }
    slices = {"worst_slice": "age=60+", "worst_slice_acc": 0.7, "class_recall_gap": 0.05}
    metrics = {
        "accuracy": 0.9,
        "accuracy_ci95": [0.8, 0.95],
        "majority_rate": 0.5,
        "macro_f1": 0.9,
        "roc_auc": 0.95,
        "ece": 0.03,
        "params": 10,
        "inference_images_per_s": 100.0,
        "n": 40,
        "per_class": {"Female": {"precision": 0.9, "recall": 0.9, "f1": 0.9}},
        "eval_sets": {"faces": scores},
        "slices": {"faces": slices},
    }
    written = {column for column in leaderboard.metric_columns(metrics) if "_faces" in column}
    runs = [_run(tmp_path, "a", 2), _run(tmp_path, "b", 6)]
    for run, wrong in zip(runs, (2, 6)):
        _eval_predictions(run, wrong)
    ranked = leaderboard.rank_rows(runs, eval_sets=["faces"])
    written |= {column for column in ranked.columns if "_faces" in column}
    declared = {template.format("faces") for template in leaderboard.EVAL_SET_COLUMNS}
    assert written - {"recall_Female_faces", "recall_Male_faces"} == declared
