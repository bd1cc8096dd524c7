"""Evaluation beyond one accuracy: slices against hand-computed values, temperature scaling, images
without a prediction, eval-set folders checked before any work, and the ensemble's mean."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gendertune.config import ConfigError
from data_prep.errors import PrepInputError
from tuning.calibration import calibrated_probability, fit_temperature
from tuning.ensemble import choose_members, mean_probability
from tuning.eval_sets import load_eval_set
from tuning.metrics import evaluate_predictions, expected_calibration_error, most_confident_mistakes
from tuning.metrics import wilson_ci
from tuning.slices import slice_labels, slice_report, slices_of

CLASSES = ("Female", "Male")


def test_slice_report_matches_hand_counts():
    # 8 images: group a = first 4 (labels 0,0,1,1), group b = last 4; predictions chosen by hand.
    labels = [0, 0, 1, 1, 0, 1, 1, 1]
    probs = [0.2, 0.7, 0.9, 0.8, 0.4, 0.3, 0.1, 0.6]  # a: right, wrong, right, right; b: right, wrong, wrong, right
    groups = pd.DataFrame({"group": list("aaaabbbb")})
    report = slice_report(labels, probs, groups, class_names=CLASSES, min_images=4)
    a, b = report["slices"]
    assert (a["value"], a["n"], a["accuracy"]) == ("a", 4, 0.75)
    assert (b["value"], b["n"], b["accuracy"]) == ("b", 4, 0.5)
    assert a["recall"] == {"Female": 0.5, "Male": 1.0} and b["recall"] == {"Female": 1.0, "Male": 1 / 3}
    assert b["class_counts"] == {"Female": 1, "Male": 3}
    assert a["ci95"] == pytest.approx(wilson_ci(3, 4)) and a["ci95"][0] < 0.75 < a["ci95"][1]
    assert report["worst_slice"] == "group=b" and report["worst_slice_acc"] == 0.5
    assert report["largest_gap"] == pytest.approx(0.25) and report["largest_gap_column"] == "group"
    # Overall recall: Female 2/3 right, Male 3/5 right.
    assert report["class_recall_gap"] == pytest.approx(2 / 3 - 3 / 5)


def test_small_slices_are_reported_but_not_ranked():
    groups = pd.DataFrame({"group": ["big"] * 40 + ["tiny"] * 3})
    labels = np.r_[np.zeros(40, int), np.ones(3, int)]
    probs = np.r_[np.full(40, 0.4), np.full(3, 0.1)]  # big all right, tiny all wrong
    report = slice_report(labels, probs, groups, class_names=CLASSES)
    tiny = next(row for row in report["slices"] if row["value"] == "tiny")
    assert tiny["accuracy"] == 0 and not tiny["ranked"]
    assert report["worst_slice"] == "group=big"  # the tiny slice is too small to call the worst


def test_numeric_columns_become_bands():
    ages = pd.Series([18, 25, 31, 44, 45, 59, 60, 90, 33, 22, 71, 50, 19], name="age")
    assert slice_labels(ages).tolist() == ["18-29", "18-29", "30-44", "30-44", "45-59", "45-59", "60+", "60+",
                                           "30-44", "18-29", "60+", "45-59", "18-29"]
    scores = pd.Series(np.arange(100.0), name="score")
    assert slice_labels(scores).nunique() == 4  # quartiles
    assert slice_labels(pd.Series(["1", "2", "1"], name="level")).tolist() == ["1", "2", "1"]  # few values: categories


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    true_margin = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_margin))).astype(int)
    overconfident = 4 * true_margin  # the same ranking, four times too sure
    temperature = fit_temperature(labels[:2000], overconfident[:2000])
    assert temperature == pytest.approx(4, rel=0.15)
    before = expected_calibration_error(labels[2000:], calibrated_probability(overconfident[2000:], 1.0))
    after = expected_calibration_error(labels[2000:], calibrated_probability(overconfident[2000:], temperature))
    assert after < before / 3, (before, after)
    # Scaling never changes a predicted class.
    assert ((calibrated_probability(overconfident, temperature) >= 0.5) == (overconfident >= 0)).all()


def test_an_image_without_prediction_counts_as_wrong():
    result = evaluate_predictions([0, 1, 1, 0], [0.1, 0.9, np.nan, 0.2])
    assert result["accuracy"] == 0.75 and result["no_prediction"] == 1
    assert result["per_class"]["Male"]["recall"] == 0.5  # the Male image without a prediction was missed
    assert result["roc_auc"] == 1.0  # on the images that have a probability


def test_most_confident_mistakes_come_first():
    predictions = pd.DataFrame({"image_id": list("abcde"), "label": [0, 1, 0, 1, 0],
                                "prob_positive": [0.9, 0.2, 0.6, 0.95, np.nan]})
    assert most_confident_mistakes(predictions)["image_id"].tolist() == ["a", "b", "c"]


def _write_set(folder, rows, *, name="labels.csv"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image in rows["image_id"]:
        (folder / "images" / image).write_bytes(b"not checked here")
    rows.to_csv(folder / name, index=False)


def test_eval_set_is_read_with_its_group_columns(tmp_path):
    _write_set(tmp_path, pd.DataFrame({"image_id": ["a.jpg", "b.jpg"], "Male": [1, 0], "race": ["x", "y"]}))
    eval_set = load_eval_set(f"mine={tmp_path}", attribute="Male")
    assert eval_set.name == "mine" and eval_set.slice_columns == ["race"]
    assert eval_set.table["path"].tolist() == [str(tmp_path / "images" / "a.jpg"), str(tmp_path / "images" / "b.jpg")]
    assert eval_set.table["label"].tolist() == [1, 0]


@pytest.mark.parametrize("case, error, match", [
    ("no_equals", ConfigError, "expected NAME=DIR"),
    ("bad_name", ConfigError, "expected NAME=DIR"),
    ("no_folder", ConfigError, "does not exist"),
    ("two_csvs", ConfigError, "2 CSV files"),
    ("no_attribute", PrepInputError, "no attribute column 'Male'"),
    ("missing_image", ConfigError, "1 image\\(s\\) named in .* are missing"),
])
def test_bad_eval_sets_fail_before_any_work(tmp_path, case, error, match):
    rows = pd.DataFrame({"image_id": ["a.jpg"], "Male": [1]})
    spec = f"set={tmp_path}"
    if case == "no_equals":
        spec = str(tmp_path)
    elif case == "bad_name":
        spec = f"1st={tmp_path}"
    elif case == "no_folder":
        spec = f"set={tmp_path / 'absent'}"
    elif case == "two_csvs":
        _write_set(tmp_path, rows, name="a.csv")
        rows.to_csv(tmp_path / "b.csv", index=False)
    elif case == "no_attribute":
        _write_set(tmp_path, rows.rename(columns={"Male": "gender"}))
    elif case == "missing_image":
        _write_set(tmp_path, rows)
        pd.DataFrame({"image_id": ["a.jpg", "gone.jpg"], "Male": [1, 0]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(error, match=match):
        load_eval_set(spec, attribute="Male")


def test_ensemble_members_and_mean_probability(tmp_path):
    ranked = pd.DataFrame({"model": ["a", "b", "c", "d"], "status": ["ok", "ok", "ok", "error"],
                           "accuracy": [0.9, 0.88, 0.7, np.nan], "ci95_low": [0.85, 0.83, 0.6, np.nan]})
    assert choose_members(ranked, 0) == ["a", "b"]  # c lies outside the leader's CI
    assert choose_members(ranked, 3) == ["a", "b", "c"]
    assert choose_members(ranked.iloc[[0, 2]], 0) == []  # one model is no ensemble
    for name, probs in (("a", [0.9, 0.2, 0.6]), ("b", [0.7, np.nan, 0.2])):
        (tmp_path / name).mkdir()
        pd.DataFrame({"image_id": ["1", "2", "3"], "label": [1, 0, 1], "prob_positive": probs}).to_csv(
            tmp_path / name / "test_predictions.csv", index=False)
    mean = mean_probability([str(tmp_path / "a"), str(tmp_path / "b")], "test_predictions.csv", "image_id")
    assert mean["prob_positive"].iloc[[0, 2]].tolist() == pytest.approx([0.8, 0.4])
    assert np.isnan(mean["prob_positive"].iloc[1])  # a member without a prediction: the ensemble has none


def test_slices_of_looks_groups_up_by_key_not_by_position():
    scored = pd.DataFrame({"path": ["c", "a", "b", "d"], "label": [1, 0, 1, 0], "prob_positive": [0.9, 0.8, 0.2, 0.1]})
    groups = pd.DataFrame({"path": ["a", "b", "c", "d"], "group": ["x", "x", "y", "y"]})  # another order
    by_key = slices_of(scored, groups, key="path", class_names=CLASSES)
    aligned = slice_report(scored["label"], scored["prob_positive"], pd.DataFrame({"group": ["y", "x", "x", "y"]}),
                           class_names=CLASSES)
    assert [(s["value"], s["accuracy"]) for s in by_key["slices"]] == [("x", 0.0), ("y", 1.0)]
    assert by_key["slices"] == aligned["slices"]
