"""Tests for gendertune.tuning.compare.ensemble: which models join the ensemble, and its mean probability."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gendertune.tuning.compare.ensemble import choose_members, mean_probability


def test_ensemble_members_and_mean_probability(tmp_path):
    ranked = pd.DataFrame(
        {
            "model": ["a", "b", "c", "d"],
            "status": ["ok", "ok", "ok", "error"],
            "accuracy": [0.9, 0.88, 0.7, np.nan],
            "ci95_low": [0.85, 0.83, 0.6, np.nan],
        }
    )
    assert choose_members(ranked, 0) == ["a", "b"]  # c lies outside the leader's CI
    assert choose_members(ranked, 3) == ["a", "b", "c"]
    assert choose_members(ranked.iloc[[0, 2]], 0) == []  # one model is no ensemble
    for name, probs in (("a", [0.9, 0.2, 0.6]), ("b", [0.7, np.nan, 0.2])):
        (tmp_path / name).mkdir()
        pd.DataFrame({"image_id": ["1", "2", "3"], "label": [1, 0, 1], "prob_positive": probs}).to_csv(
            tmp_path / name / "test_predictions.csv", index=False
        )
    mean = mean_probability([str(tmp_path / "a"), str(tmp_path / "b")], "test_predictions.csv", "image_id")
    assert mean["prob_positive"].iloc[[0, 2]].tolist() == pytest.approx([0.8, 0.4])
    assert np.isnan(mean["prob_positive"].iloc[1])  # a member without a prediction: the ensemble has none
