"""Evaluation metrics for a binary face-gender classifier: pure functions, no torch, no Ray.

This module owns how a set of test-set predictions becomes numbers: accuracy with a Wilson
confidence interval, per-class precision/recall/F1, ROC-AUC, calibration (ECE), the confusion
matrix, the majority-class baseline, and McNemar's test for comparing two classifiers on the same
examples. Labels follow CelebA's 'Male' attribute: 1 = Male, 0 = Female. Every function validates
its inputs and returns plain Python types, so results can go straight into JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest, chi2
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

ECE_BINS = 15
# Below this many discordant pairs the chi-square approximation is poor, so McNemar's test uses
# the exact binomial distribution instead (the usual rule of thumb).
MCNEMAR_EXACT_BELOW = 25


def _as_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"length mismatch: {name_a} has {a.size} entries, {name_b} has {b.size}")


def _as_binary(values: Any, name: str) -> np.ndarray:
    """Return `values` as a bool array, accepting bools or the integers 0/1 only."""
    array = _as_1d(values, name)
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.number) or not np.isin(array, (0, 1)).all():
            bad = sorted(set(np.unique(array).tolist()) - {0, 1})[:5]
            raise ValueError(f"{name} must contain only 0/1 (or booleans); found {bad}")
        array = array.astype(bool)
    return array


def _validate_predictions(y_true: Any, prob_male: Any, *, allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_binary(y_true, "y_true")
    probs = _as_1d(prob_male, "prob_male")
    _check_same_length(labels, probs, "y_true", "prob_male")
    if not np.issubdtype(probs.dtype, np.number) or probs.dtype == bool:
        raise ValueError(f"prob_male must be numeric probabilities, got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    known = ~np.isnan(probs) if allow_missing else np.ones(probs.shape, bool)
    outside = known & (~np.isfinite(probs) | (probs < 0.0) | (probs > 1.0))
    if outside.any():
        raise ValueError(
            f"prob_male must lie in [0, 1]; {int(outside.sum())} value(s) do not, e.g. {probs[outside][0]!r}"
        )
    return labels.astype(np.int64), probs


def wilson_ci(correct: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (scipy's): sound for small counts and for
    accuracies near 0 or 1, where the normal approximation and the bootstrap are not. No
    randomness, so the same predictions always give the same interval."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n == 0:
        return (float("nan"), float("nan"))
    interval = binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(interval.low), float(interval.high)


def expected_calibration_error(y_true: Any, prob_male: Any, *, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the predicted class's confidence.

    Confidence is the probability the model gives its predicted class, max(p, 1 - p), so it lies
    in [0.5, 1]. The interval [0, 1] is cut into `n_bins` equal-width bins, right-closed
    ((k/M, (k+1)/M], with 0 joining the first). ECE = sum over bins of
    (examples in bin / n) * |accuracy in bin - mean confidence in bin|: 0 for a perfectly
    calibrated model, approaching 1 for one that is confidently wrong.
    """
    labels, probs = _validate_predictions(y_true, prob_male)
    predicted = (probs >= 0.5).astype(np.int64)
    confidence = np.where(predicted == 1, probs, 1.0 - probs)
    correct = (predicted == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=confidence, minlength=n_bins)
    )
    # |sum(correct) - sum(confidence)| / n per bin equals (|B|/n) * |acc(B) - conf(B)|.
    return float(gap[count > 0].sum() / labels.size)


def evaluate_predictions(
    y_true: Any,
    prob_male: Any,
    *,
    class_names: Sequence[str] = ("Female", "Male"),
    prob_uncalibrated: Any = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """All test-set metrics for one classifier, as a JSON-serialisable dict.

    `prob_male` is what the model outputs (calibrated where it was); `ece_calibrated` is its
    expected calibration error, and `ece` that of `prob_uncalibrated`, the probabilities before
    temperature scaling, when given (else the two are the same). Calibration never moves a
    probability across 0.5, so every other metric is the same either way.

    The predicted class is Male when prob_male >= `threshold` (0.5 unless one was chosen on
    validation, gendertune.tuning.evaluate.decision). `majority_rate` (the accuracy of always
    guessing the most common true class) sits next to accuracy because CelebA is imbalanced
    (about 58% Female): 0.6 accuracy there is no better than guessing.

    NaN in prob_male means the image got no prediction (unreadable, or no face where the model's
    policy rejects those). It counts as wrong in accuracy, recall and F1, so a pipeline that skips
    hard photos cannot look better for it; ROC-AUC and ECE, which need a probability, use the
    predicted images only. `no_prediction` says how many there were.
    """
    if len(class_names) != 2:
        raise ValueError(f"class_names must name exactly 2 classes, got {list(class_names)}")
    labels, probs = _validate_predictions(y_true, prob_male, allow_missing=True)
    known = ~np.isnan(probs)
    raw = (
        probs if prob_uncalibrated is None else _validate_predictions(y_true, prob_uncalibrated, allow_missing=True)[1]
    )
    predicted = np.where(known, probs >= threshold, -1).astype(np.int64)  # -1: neither class
    correct = predicted == labels

    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=[0, 1], zero_division=0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }

    male_share = float(labels.mean())
    scored = labels[known]
    if known.any() and 0 < scored.sum() < scored.size:
        roc_auc, roc_auc_reason = float(roc_auc_score(scored, probs[known])), None
    elif known.any():
        only = class_names[int(scored[0])]
        roc_auc, roc_auc_reason = None, f"only one class ({only}) present in y_true"
    else:
        roc_auc, roc_auc_reason = None, "no image got a prediction"

    return {
        "n": int(labels.size),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": list(wilson_ci(int(correct.sum()), correct.size)),
        "majority_rate": max(male_share, 1.0 - male_share),
        "per_class": per_class,
        "macro_f1": float(np.mean(f1)),
        "roc_auc": roc_auc,
        "roc_auc_reason": roc_auc_reason,
        "ece": expected_calibration_error(scored, raw[known]) if known.any() else None,
        "ece_calibrated": expected_calibration_error(scored, probs[known]) if known.any() else None,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
        "no_prediction": int((~known).sum()),
    }


def mcnemar_test(correct_a: Any, correct_b: Any) -> dict[str, Any]:
    """McNemar's test: do classifiers A and B differ in accuracy on the same examples?

    Only discordant examples matter: b = A right and B wrong, c = A wrong and B right. Under the
    null hypothesis each discordant example is equally likely to go either way. With fewer than
    25 of them the p-value is scipy's exact two-sided binomial test of min(b, c) out of b + c at
    1/2, and `statistic` is min(b, c). Otherwise it is the continuity-corrected chi-square
    statistic (|b - c| - 1)^2 / (b + c), with scipy's chi-square(1) survival function.
    """
    a = _as_binary(correct_a, "correct_a")
    b_arr = _as_binary(correct_b, "correct_b")
    _check_same_length(a, b_arr, "correct_a", "correct_b")
    b = int(np.sum(a & ~b_arr))
    c = int(np.sum(~a & b_arr))
    n = b + c
    if n < MCNEMAR_EXACT_BELOW:
        smaller = min(b, c)
        p_value = float(binomtest(smaller, n, 0.5).pvalue) if n else 1.0
        return {"b": b, "c": c, "statistic": float(smaller), "p_value": p_value, "method": "exact"}
    statistic = (abs(b - c) - 1) ** 2 / n
    p_value = float(chi2.sf(statistic, df=1))
    return {"b": b, "c": c, "statistic": statistic, "p_value": p_value, "method": "chi2_cc"}


def most_confident_mistakes(predictions: pd.DataFrame, *, limit: int = 16, threshold: float = 0.5) -> pd.DataFrame:
    """The wrong predictions (columns label, prob_positive) the model was surest of, surest first:
    what a person should look at to see how a model fails."""
    scored = predictions.dropna(subset=["prob_positive"])
    predicted = (scored["prob_positive"] >= threshold).astype(int)
    wrong = scored[predicted != scored["label"]]
    confidence = np.maximum(wrong["prob_positive"], 1 - wrong["prob_positive"])
    return wrong.assign(confidence=confidence).sort_values("confidence", ascending=False, kind="stable").head(limit)
