"""Tests for gendertune.tuning.evaluate.calibration: temperature scaling of an overconfident model."""

from __future__ import annotations

import numpy as np
import pytest

from gendertune.tuning.evaluate.calibration import calibrated_probability, fit_temperature
from gendertune.tuning.evaluate.metrics import expected_calibration_error


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
