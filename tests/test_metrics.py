"""Tests for gendertune.tuning.evaluate.metrics (evaluation numbers, McNemar) and gendertune.base.plots (PNG figures)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from gendertune.base import plots
from gendertune.tuning.evaluate.metrics import (
    evaluate_predictions,
    expected_calibration_error,
    mcnemar_test,
    most_confident_mistakes,
    wilson_ci,
)


def _calibrated(confidence: float, n: int, predict_male: bool) -> tuple[np.ndarray, np.ndarray]:
    """n predictions at `confidence` of which exactly round(confidence * n) are right."""
    n_right = round(confidence * n)
    predicted = 1 if predict_male else 0
    y = np.array([predicted] * n_right + [1 - predicted] * (n - n_right))
    prob_male = np.full(n, confidence if predict_male else 1.0 - confidence)
    return y, prob_male


# --- evaluate_predictions --------------------------------------------------------------------


def test_hand_made_example():
    y = [0, 0, 0, 1, 1, 0]
    p = [0.1, 0.4, 0.7, 0.9, 0.2, 0.5]  # predictions 0, 0, 1, 1, 0, 1 (0.5 counts as Male)
    result = evaluate_predictions(y, p)
    assert result["n"] == 6
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["confusion_matrix"] == [[2, 2], [1, 1]]  # [[tn, fp], [fn, tp]]
    assert result["majority_rate"] == pytest.approx(4 / 6)
    female, male = result["per_class"]["Female"], result["per_class"]["Male"]
    assert female == pytest.approx({"precision": 2 / 3, "recall": 2 / 4, "f1": 4 / 7, "support": 4})
    assert male == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5, "support": 2})
    assert result["macro_f1"] == pytest.approx((4 / 7 + 2 / 5) / 2)
    json.dumps(result)  # plain Python types throughout


def test_roc_auc_matches_sklearn_and_is_none_for_one_class():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 500), 0, 1)
    result = evaluate_predictions(y, p)
    assert result["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert result["roc_auc_reason"] is None

    one_class = evaluate_predictions([1, 1, 1], [0.9, 0.2, 0.6])
    assert one_class["roc_auc"] is None
    assert "Male" in one_class["roc_auc_reason"]
    assert one_class["majority_rate"] == 1.0


def test_custom_class_names_key_per_class():
    result = evaluate_predictions([0, 1], [0.2, 0.8], class_names=("F", "M"))
    assert set(result["per_class"]) == {"F", "M"}


def test_an_image_without_prediction_counts_as_wrong():
    result = evaluate_predictions([0, 1, 1, 0], [0.1, 0.9, np.nan, 0.2])
    assert result["accuracy"] == 0.75 and result["no_prediction"] == 1
    assert result["per_class"]["Male"]["recall"] == 0.5  # the Male image without a prediction was missed
    assert result["roc_auc"] == 1.0  # on the images that have a probability


def test_most_confident_mistakes_come_first():
    predictions = pd.DataFrame(
        {"image_id": list("abcde"), "label": [0, 1, 0, 1, 0], "prob_positive": [0.9, 0.2, 0.6, 0.95, np.nan]}
    )
    assert most_confident_mistakes(predictions)["image_id"].tolist() == ["a", "b", "c"]


# --- accuracy CI ----------------------------------------------------------------------------


def test_ci_contains_accuracy_and_narrows_with_more_data():
    rng = np.random.default_rng(2)
    small = rng.random(200) < 0.8
    large = rng.random(20_000) < 0.8
    lo_s, hi_s = wilson_ci(int(small.sum()), small.size)
    lo_l, hi_l = wilson_ci(int(large.sum()), large.size)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # width shrinks like 1/sqrt(n): 10x here


def test_ci_is_the_wilson_interval_and_needs_no_seed():
    # Wilson's closed form for 8 of 10: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
    z, n, p = 1.959963984540054, 10, 0.8
    centre, half = p + z**2 / (2 * n), z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert wilson_ci(8, 10) == pytest.approx(((centre - half) / (1 + z**2 / n), (centre + half) / (1 + z**2 / n)))
    low, high = wilson_ci(10, 10)  # all right: the interval still has width, unlike a bootstrap's
    assert high == pytest.approx(1.0) and low < 0.75
    y, p = _calibrated(0.7, 1000, True)
    assert evaluate_predictions(y, p)["accuracy_ci95"] == evaluate_predictions(y, p)["accuracy_ci95"]


# --- ECE -------------------------------------------------------------------------------------


def test_ece_zero_when_perfectly_calibrated():
    # Three bins, both predicted classes: each bin's accuracy equals its confidence exactly.
    parts = [_calibrated(0.8, 100, True), _calibrated(0.6, 50, False), _calibrated(0.95, 40, True)]
    y = np.concatenate([part[0] for part in parts])
    p = np.concatenate([part[1] for part in parts])
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    assert evaluate_predictions(y, p)["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_large_for_confident_wrong_predictions():
    y = np.array([0] * 90 + [1] * 10)
    p = np.full(100, 0.99)  # always "Male" at 99% confidence, right 10% of the time
    assert expected_calibration_error(y, p) == pytest.approx(0.99 - 0.10)


def test_ece_weights_bins_by_size():
    y1, p1 = _calibrated(0.8, 100, True)  # calibrated: contributes 0
    y2 = np.zeros(25, dtype=int)  # 25 confident Male predictions, all wrong: gap 0.9
    p2 = np.full(25, 0.9)
    ece = expected_calibration_error(np.concatenate([y1, y2]), np.concatenate([p1, p2]))
    assert ece == pytest.approx(25 / 125 * 0.9)


# --- McNemar ---------------------------------------------------------------------------------


def _paired(b: int, c: int, both_right: int = 30, both_wrong: int = 5):
    a = [True] * b + [False] * c + [True] * both_right + [False] * both_wrong
    other = [False] * b + [True] * c + [True] * both_right + [False] * both_wrong
    return np.array(a), np.array(other)


def test_mcnemar_exact_matches_hand_computation():
    result = mcnemar_test(*_paired(1, 9))
    expected = 2 * (math.comb(10, 0) + math.comb(10, 1)) / 2**10  # 0.021484375
    assert (result["b"], result["c"], result["method"]) == (1, 9, "exact")
    assert result["p_value"] == pytest.approx(expected, rel=1e-12)
    assert result["p_value"] == pytest.approx(0.021484375)


def test_mcnemar_exact_is_symmetric_and_capped_at_one():
    assert mcnemar_test(*_paired(9, 1))["p_value"] == mcnemar_test(*_paired(1, 9))["p_value"]
    assert mcnemar_test(*_paired(5, 5))["p_value"] == 1.0


def test_mcnemar_chi2_branch_matches_formula():
    b, c = 120, 80
    result = mcnemar_test(*_paired(b, c))
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    assert result["method"] == "chi2_cc"
    assert result["statistic"] == pytest.approx(statistic)
    # chi2(1) survival at 7.605 is 0.005820... (scipy.stats.chi2.sf(7.605, 1)).
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(statistic / 2)))
    assert result["p_value"] == pytest.approx(0.0058203, rel=1e-4)


def test_mcnemar_switches_to_chi2_at_25_discordant():
    assert mcnemar_test(*_paired(12, 12))["method"] == "exact"
    assert mcnemar_test(*_paired(13, 12))["method"] == "chi2_cc"


def test_mcnemar_identical_classifiers():
    correct = np.random.default_rng(7).random(300) < 0.8
    result = mcnemar_test(correct, correct)
    assert (result["b"], result["c"], result["p_value"]) == (0, 0, 1.0)


# --- input validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1, 1], [0.2, 0.8], "length mismatch"),
        ([0, 1], [0.2, 1.2], r"\[0, 1\]"),
        ([0, 1], [-0.1, 0.5], r"\[0, 1\]"),
        ([0, 1], [float("inf"), 0.5], r"\[0, 1\]"),  # NaN is allowed: an image without a prediction
        ([0, 2], [0.2, 0.8], "only 0/1"),
        (["F", "M"], [0.2, 0.8], "only 0/1"),
        ([], [], "empty"),
        ([[0, 1]], [[0.2, 0.8]], "one-dimensional"),
    ],
)
def test_evaluate_rejects_bad_inputs(y, p, message):
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(y, p)


def test_other_functions_reject_bad_inputs():
    with pytest.raises(ValueError, match="length mismatch"):
        mcnemar_test([True, False], [True])
    with pytest.raises(ValueError, match="only 0/1"):
        mcnemar_test([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="level"):
        wilson_ci(1, 2, level=1.5)
    with pytest.raises(ValueError, match="exactly 2"):
        evaluate_predictions([0, 1], [0.1, 0.9], class_names=("A", "B", "C"))


# --- plots -----------------------------------------------------------------------------------


def _history(shift: float = 0.0) -> pd.DataFrame:
    epochs = np.arange(1, 6)
    return pd.DataFrame(
        {
            "epoch": epochs,
            "train_acc": 0.7 + 0.05 * epochs - shift,
            "val_acc": 0.68 + 0.04 * epochs - shift,
            "train_loss": 0.6 / epochs,
            "val_loss": 0.65 / epochs,
        }
    )


_ROWS = [
    {"model": "small_cnn", "accuracy": 0.93, "ci_lo": 0.925, "ci_hi": 0.935, "images_per_s": 9000},
    {"model": "resnet18", "accuracy": 0.97, "ci_lo": 0.967, "ci_hi": 0.973, "images_per_s": 1200},
]
_CM = [[900, 40], [30, 700]]

PLOT_CALLS = {
    "accuracy_per_epoch": lambda path: plots.plot_accuracy_per_epoch(_history(), path),
    "loss_per_epoch": lambda path: plots.plot_loss_per_epoch(_history(), path),
    "confusion_matrix": lambda path: plots.plot_confusion_matrix(_CM, path, title="test"),
    "class_distribution": lambda path: plots.plot_class_distribution(
        {"train": {"Female": 94509, "Male": 68261}, "test": {"Female": 12247, "Male": 7715}}, path
    ),
    "accuracy_with_ci": lambda path: plots.plot_accuracy_with_ci(_ROWS, path),
    "confusion_matrices": lambda path: plots.plot_confusion_matrices(
        {"small_cnn": _CM, "resnet18": [[930, 10], [20, 710]]}, path
    ),
    "histories": lambda path: plots.plot_histories({"small_cnn": _history(0.05), "resnet18": _history()}, path),
    "accuracy_vs_speed": lambda path: plots.plot_accuracy_vs_speed(_ROWS, path),
}


@pytest.mark.parametrize("name", PLOT_CALLS)
def test_plot_writes_png(tmp_path, name):
    path = tmp_path / "figures" / f"{name}.png"  # parent does not exist yet
    returned = PLOT_CALLS[name](path)
    assert returned == path
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


def test_plot_rejects_history_without_columns(tmp_path):
    with pytest.raises(ValueError, match="val_acc"):
        plots.plot_accuracy_per_epoch(_history().drop(columns="val_acc"), tmp_path / "x.png")


def test_ece_is_reported_before_and_after_calibration_and_nothing_else_moves():
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    raw = np.array([0.01, 0.99, 0.6, 0.45, 0.97, 0.02, 0.51, 0.4])
    calibrated = 0.5 + (raw - 0.5) * 0.5  # a temperature pulls every probability toward 0.5, none across it
    both = evaluate_predictions(y, calibrated, prob_uncalibrated=raw)
    assert both["ece"] == pytest.approx(expected_calibration_error(y, raw))
    assert both["ece_calibrated"] == pytest.approx(expected_calibration_error(y, calibrated))
    assert both["ece"] != pytest.approx(both["ece_calibrated"])
    alone = evaluate_predictions(y, calibrated)
    assert alone["ece"] == alone["ece_calibrated"] == both["ece_calibrated"]
    assert {k: v for k, v in both.items() if k != "ece"} == {k: v for k, v in alone.items() if k != "ece"}
