"""How a trained network's outputs become a decision, two options that are off by default:

- flip test-time augmentation: the logits of each face and of its mirror image, averaged, so a
  face and its mirror get the same answer (2x inference). Used by the held-out evaluation
  (gendertune.tuning.train.run), eval sets and predict alike (run.py stores the choice in model.pt).
- the decision threshold on the calibrated P(class 1), chosen on validation: the one that
  maximises balanced accuracy (the mean of the two classes' recall). Balanced accuracy does not
  depend on how common each class is, which differs between CelebA (58% women) and the photos a
  model is used on; 0.5 is the default.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from gendertune.models.registry import split_outputs

TestTimeAugmentation = Literal["none", "flip"]
DecisionThreshold = Literal["fixed", "balanced"]
FIXED_THRESHOLD = 0.5


class FlipAveraged(nn.Module):
    """`model`'s main logits averaged over each NCHW input and its left-right mirror image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        both = torch.cat([images, torch.flip(images, dims=[3])])
        logits, _ = split_outputs(self.model(both))
        plain, mirrored = logits.chunk(2)
        return (plain + mirrored) / 2


def with_tta(model: nn.Module, tta: TestTimeAugmentation) -> nn.Module:
    return FlipAveraged(model) if tta == "flip" else model


def fit_threshold(labels: np.ndarray, probs: np.ndarray, rule: DecisionThreshold) -> float:
    """The threshold t (class 1 when P >= t) that `rule` picks on validation `labels` and `probs`:
    0.5 for "fixed"; for "balanced" the midpoint between two neighbouring probabilities that
    maximises the mean class recall, the one nearest 0.5 among equals."""
    labels, probs = np.asarray(labels, int), np.asarray(probs, float)
    if rule == "fixed" or len(np.unique(labels)) < 2:
        return FIXED_THRESHOLD
    order = np.argsort(probs, kind="stable")
    probs, labels = probs[order], labels[order]
    # Cut k predicts class 1 for the k-th smallest probability and up: every cut at once from cumulative counts.
    zeros_below = np.concatenate([[0], np.cumsum(labels == 0)])
    ones_from = (labels == 1).sum() - np.concatenate([[0], np.cumsum(labels == 1)])
    balanced = (zeros_below / (labels == 0).sum() + ones_from / (labels == 1).sum()) / 2
    thresholds = np.concatenate([[probs[0]], (probs[1:] + probs[:-1]) / 2, [np.nextafter(probs[-1], np.inf)]])
    valid = np.concatenate([[True], probs[1:] > probs[:-1], [True]])  # no cut between equal probabilities
    balanced, thresholds = balanced[valid], thresholds[valid]
    best = np.flatnonzero(np.isclose(balanced, balanced.max()))
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - FIXED_THRESHOLD))]])
