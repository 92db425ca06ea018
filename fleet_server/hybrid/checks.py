"""Does a device follow its plan? Binomial intervals, not point comparisons.

A device planned to send a share ``p`` of its requests to the cloud (its
plan's ``expected_offload``) chose to send ``k`` of its ``n`` requests in a
window. What tau predicts is the choice, not what the quota let through: from
a :class:`~protocol.hybrid.HybridSummary`, ``k = escalated + kept_local_quota
+ audits`` and ``n = requests`` (a device whose confidence drifted low shows
up in ``kept_local_quota`` even while its quota holds what it sends to its
share). ``k / n`` is never exactly ``p``; the question is
whether ``p`` is plausible given ``k`` of ``n``. The Wilson score interval
answers it (it stays inside [0, 1] and behaves at ``k = 0`` and ``k = n``,
where the normal approximation does not): the plan holds while ``p`` lies
inside the interval of ``k`` of ``n`` at the chosen confidence. A device with
no request in the window (``n = 0``) gives no evidence and is inside.

The same test reads agreement against calibration: ``k`` audits of ``n``
agreed with the cloud, against ``p`` = the mean calibrated confidence of
those audits.

Pure and vectorised: arrays in, arrays out.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from fleet_server.errors import Invalid

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

CONFIDENCE = 0.95  # two-sided level of the interval unless told


class CheckInputError(Invalid, ValueError):
    """Counts or a share given to a plan check are out of range (the message says which)."""


def z_score(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (0.95 → 1.96)."""
    if not 0.0 < confidence < 1.0:
        raise CheckInputError(f"confidence {confidence!r} refused: it must be in (0, 1)")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _counts(k: npt.ArrayLike, n: npt.ArrayLike) -> tuple[Floats, Floats]:
    kk = np.asarray(k, dtype=np.float64)
    nn = np.asarray(n, dtype=np.float64)
    if kk.shape != nn.shape:
        raise CheckInputError(f"counts refused: k has shape {kk.shape} but n has {nn.shape}")
    bad = ~(np.isfinite(kk) & np.isfinite(nn) & (kk >= 0) & (kk <= nn))
    if bool(np.any(bad)):
        first = int(np.argmax(bad.ravel()))
        raise CheckInputError(
            f"counts refused: {int(np.count_nonzero(bad))} with k outside [0, n], "
            f"the first k={kk.ravel()[first]!r} of n={nn.ravel()[first]!r}"
        )
    return kk, nn


def wilson_interval(
    k: npt.ArrayLike, n: npt.ArrayLike, confidence: float = CONFIDENCE
) -> tuple[Floats, Floats]:
    """The Wilson score interval ``(low, high)`` of a share, from ``k`` successes of ``n``.

    Elementwise over arrays of the same shape; ``n = 0`` gives ``(0, 1)``.
    Refuses (naming it) a ``k`` below 0 or above ``n``.
    """
    kk, nn = _counts(k, n)
    z = z_score(confidence)
    z2 = z * z
    with np.errstate(divide="ignore", invalid="ignore"):
        phat = kk / nn
        denominator = 1.0 + z2 / nn
        centre = (phat + z2 / (2.0 * nn)) / denominator
        half = z * np.sqrt(phat * (1.0 - phat) / nn + z2 / (4.0 * nn * nn)) / denominator
    empty = nn <= 0
    # At k = 0 (k = n) the bound is 0 (1) exactly, not 0 (1) give or take rounding.
    low: Floats = np.where(empty | (kk == 0), 0.0, np.clip(centre - half, 0.0, 1.0))
    high: Floats = np.where(empty | (kk == nn), 1.0, np.clip(centre + half, 0.0, 1.0))
    return low, high


def within_plan(
    k: npt.ArrayLike, n: npt.ArrayLike, expected: npt.ArrayLike, confidence: float = CONFIDENCE
) -> Bools:
    """Whether each expected share is plausible given ``k`` of ``n`` (inside its Wilson interval).

    ``expected`` is a share in [0, 1] (a plan's ``expected_offload``, or the
    agreement calibration promised); ``n = 0`` is inside (no evidence).
    """
    p = np.asarray(expected, dtype=np.float64)
    low, high = wilson_interval(k, n, confidence)
    if p.shape != low.shape and p.ndim != 0:
        raise CheckInputError(f"expected refused: shape {p.shape}, the counts have {low.shape}")
    if bool(np.any(~np.isfinite(p) | (p < 0) | (p > 1))):
        raise CheckInputError("expected refused: every expected share must be in [0, 1]")
    # A hair of slack: an interval that ends exactly at p must not flip on rounding.
    out: Bools = (p >= low - 1e-12) & (p <= high + 1e-12)
    return out
