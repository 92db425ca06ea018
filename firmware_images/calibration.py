"""Calibration of the sample models and what a hybrid of two of them achieves.

:func:`fit_temperature` is temperature scaling (Guo et al., 2017) for models
whose output is probabilities: the ``T`` that minimises the negative
log-likelihood of ``softmax(log(p) / T)`` on labelled rows, the same
transform :func:`protocol.hybrid.calibrated_probabilities` applies on the
device. :func:`expected_calibration_error` measures how far the top score is
from the accuracy it claims, and :func:`offload_curve` the accuracy of a
device model that sends its least confident rows to a cloud model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from protocol.hybrid import calibrated_confidence, calibrated_probabilities

__all__ = [
    "ECE_BINS",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "offload_curve",
]

# Equal-width bins of the top score for the expected calibration error.
ECE_BINS = 15
# Temperatures searched, and how finely: golden-section search over log T.
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))
_SEARCH_STEPS = 60


def negative_log_likelihood(
    probabilities: ArrayLike, labels: ArrayLike, temperature: float
) -> float:
    """Mean ``-log`` of the calibrated probability of each row's true class."""
    p = calibrated_probabilities(np.asarray(probabilities), temperature)
    y = np.asarray(labels, dtype=np.int64)
    picked = p[np.arange(y.size), y]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def fit_temperature(probabilities: ArrayLike, labels: ArrayLike) -> float:
    """The temperature in [0.05, 20] minimising :func:`negative_log_likelihood`.

    Rounded to 4 significant digits, so the value is the same on every machine.

    The NLL is convex in ``1 / T``, so golden-section search over ``log T``
    finds its minimum.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],) or y.size == 0:
        raise ValueError(f"expected probabilities [n, k] and labels [n], got {p.shape}, {y.shape}")

    def loss(log_t: float) -> float:
        return negative_log_likelihood(p, y, math.exp(log_t))

    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(f"{math.exp((lo + hi) / 2.0):.4g}")


def expected_calibration_error(
    probabilities: ArrayLike, labels: ArrayLike, temperature: float = 1.0, bins: int = ECE_BINS
) -> float:
    """Top-label ECE: the row-weighted mean ``|accuracy - confidence|`` over ``bins`` equal bins."""
    p = calibrated_probabilities(np.asarray(probabilities), temperature)
    y = np.asarray(labels, dtype=np.int64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    which = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total / y.size


def offload_curve(
    local: ArrayLike,
    cloud: ArrayLike,
    labels: ArrayLike,
    temperature: float,
    shares: Sequence[float],
) -> list[tuple[float, float]]:
    """``(share, accuracy)`` when the ``share`` of rows least confident locally go to the cloud.

    Confidence is the local model's calibrated top score
    (:func:`protocol.hybrid.calibrated_confidence`); ties keep row order. The
    cloud answers the escalated rows, the local model the rest.
    """
    y = np.asarray(labels, dtype=np.int64)
    local_right = np.asarray(local).argmax(axis=1) == y
    cloud_right = np.asarray(cloud).argmax(axis=1) == y
    order = np.argsort(calibrated_confidence(np.asarray(local), temperature), kind="stable")
    curve = []
    for share in shares:
        escalated = np.zeros(y.size, dtype=bool)
        escalated[order[: round(share * y.size)]] = True
        right = np.where(escalated, cloud_right, local_right)
        curve.append((float(share), float(right.mean())))
    return curve
