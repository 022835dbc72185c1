"""Probability calibration: temperature scaling (Guo et al., 2017) and the expected calibration error."""

from __future__ import annotations

from typing import Dict

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

__all__ = ["softmax_with_temperature", "fit_temperature", "expected_calibration_error", "reliability_bins"]


def softmax_with_temperature(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=1)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds=(0.05, 20.0)) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of ``softmax(logits / T)`` on ``labels``.

    One scalar is fitted, so the arg-max (the predicted class) never changes; only the confidence does.
    Searching log T keeps the optimiser on positive values.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    return float(np.exp(result.x))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> Dict[str, np.ndarray]:
    """Per confidence bin (equal width on [0, 1]): count, mean confidence and accuracy of the top class."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / counts
    return {"edges": edges, "count": counts, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over equal-width confidence bins."""
    bins = reliability_bins(probabilities, labels, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    used = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float((bins["count"][used] * gaps).sum() / total)
