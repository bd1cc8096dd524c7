"""Tests for gendertune.tuning.evaluate.slices: slice reports against hand-computed values, small slices reported but
not ranked, numeric group columns as bands, and groups looked up by key."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gendertune.tuning.evaluate.metrics import wilson_ci
from gendertune.tuning.evaluate.slices import slice_labels, slice_report, slices_of

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
    assert slice_labels(ages).tolist() == [
        "18-29",
        "18-29",
        "30-44",
        "30-44",
        "45-59",
        "45-59",
        "60+",
        "60+",
        "30-44",
        "18-29",
        "60+",
        "45-59",
        "18-29",
    ]
    scores = pd.Series(np.arange(100.0), name="score")
    assert slice_labels(scores).nunique() == 4  # quartiles
    assert slice_labels(pd.Series(["1", "2", "1"], name="level")).tolist() == ["1", "2", "1"]  # few values: categories


def test_slices_of_looks_groups_up_by_key_not_by_position():
    scored = pd.DataFrame({"path": ["c", "a", "b", "d"], "label": [1, 0, 1, 0], "prob_positive": [0.9, 0.8, 0.2, 0.1]})
    groups = pd.DataFrame({"path": ["a", "b", "c", "d"], "group": ["x", "x", "y", "y"]})  # another order
    by_key = slices_of(scored, groups, key="path", class_names=CLASSES)
    aligned = slice_report(
        scored["label"], scored["prob_positive"], pd.DataFrame({"group": ["y", "x", "x", "y"]}), class_names=CLASSES
    )
    assert [(s["value"], s["accuracy"]) for s in by_key["slices"]] == [("x", 0.0), ("y", 1.0)]
    assert by_key["slices"] == aligned["slices"]
