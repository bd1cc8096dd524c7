"""Flip test-time augmentation and the validation-chosen threshold (gendertune.tuning.evaluate.decision) on a
real (untrained) network; tests/test_predict.py checks that predict applies both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gendertune.models.registry import build_model
from gendertune.tuning.evaluate.decision import FIXED_THRESHOLD, FlipAveraged, fit_threshold

SIZE = 32


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", image_size=SIZE).eval()


def test_flip_averaging_gives_a_mirrored_image_the_same_logits(network):
    images = torch.rand(4, 3, SIZE, SIZE)
    mirrored = torch.flip(images, dims=[3])
    with torch.no_grad():
        assert not torch.allclose(network(images), network(mirrored), atol=1e-4)  # the network alone is not symmetric
        averaged = FlipAveraged(network)
        assert torch.allclose(averaged(images), averaged(mirrored), atol=1e-5)
        assert torch.allclose(averaged(images), (network(images) + network(mirrored)) / 2, atol=1e-5)


def test_fixed_threshold_is_one_half():
    assert fit_threshold([0, 1, 1], [0.9, 0.1, 0.2], "fixed") == FIXED_THRESHOLD == 0.5


def test_balanced_threshold_maximises_the_mean_recall_on_validation():
    # Class 1 is rare and scored low: at 0.5 its recall is 0; between 0.3 and 0.35 both classes are all right.
    labels = np.array([0] * 8 + [1] * 2)
    probs = np.array([0.05, 0.1, 0.1, 0.15, 0.2, 0.25, 0.28, 0.3, 0.35, 0.45])
    threshold = fit_threshold(labels, probs, "balanced")
    assert threshold == pytest.approx(0.325)
    predicted = probs >= threshold
    assert (predicted == labels.astype(bool)).all()
    # Equally good thresholds: the one nearest 0.5. Here any cut between 0.3 and 0.9 separates the classes.
    assert fit_threshold([0, 0, 1, 1], [0.1, 0.3, 0.9, 0.95], "balanced") == pytest.approx(0.6)
    assert fit_threshold([1, 1], [0.2, 0.3], "balanced") == FIXED_THRESHOLD  # one class: nothing to balance


def test_balanced_threshold_agrees_with_a_brute_force_search():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probs = np.round(np.clip(0.25 * labels + rng.uniform(0, 0.75, 400), 0, 1), 2)  # ties, as real scores have

    def balanced(t):
        predicted = probs >= t
        return (
            (predicted & (labels == 1)).sum() / (labels == 1).sum()
            + (~predicted & (labels == 0)).sum() / (labels == 0).sum()
        ) / 2

    grid = np.linspace(0, 1.01, 10_101)
    assert balanced(fit_threshold(labels, probs, "balanced")) == pytest.approx(max(balanced(t) for t in grid))
