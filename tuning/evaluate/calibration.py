"""Temperature scaling (Guo et al., 2017): one number, fitted on validation, that makes a model's
probabilities mean what they say. Pure functions, no torch, no Ray.

A binary classifier's two logits reduce to one margin m = logit_1 - logit_0, and P(1) = sigmoid(m).
Scaling by a temperature T > 0, P(1) = sigmoid(m / T), keeps every prediction's class (the sign of
m) and so accuracy, and only changes how confident it is. T is the one that minimises the
validation log-loss; the test split never sees the fit.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit

# T in [1/20, 20]: wider than any network needs, narrow enough that a degenerate validation set
# (one class, or all correct with huge margins) cannot push T to a useless extreme.
LOG_T_BOUNDS = (-np.log(20.0), np.log(20.0))


def calibrated_probability(margin, temperature: float) -> np.ndarray:
    """P(label 1) from logit margins at a temperature."""
    return expit(np.asarray(margin, dtype=np.float64) / temperature)


def log_loss_at(labels, margin, temperature: float) -> float:
    scaled = np.asarray(margin, dtype=np.float64) / temperature
    truth = np.asarray(labels, dtype=np.float64)
    # log_expit is exact where sigmoid saturates, so confident mistakes cost what they should.
    return float(-np.mean(truth * log_expit(scaled) + (1 - truth) * log_expit(-scaled)))


def fit_temperature(labels, margin) -> float:
    """The temperature minimising the log-loss of (labels, margin), searched over log T."""
    labels = np.asarray(labels)
    margin = np.asarray(margin, dtype=np.float64)
    if labels.size == 0 or labels.shape != margin.shape:
        raise ValueError(
            f"fit_temperature needs matching, non-empty labels and margins, got {labels.shape} and {margin.shape}"
        )
    result = minimize_scalar(
        lambda log_t: log_loss_at(labels, margin, np.exp(log_t)),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))
