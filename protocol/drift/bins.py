"""The distribution test on the baseline's bins, with a decision that accounts for sample size.

Why not a fixed PSI threshold: with ``k`` bins, the PSI of a sample of ``n``
rows drawn from the baseline distribution itself is about ``(k - 1) / n`` (it
is ``χ²(k - 1) / n`` in distribution). With 20 bins that is 0.1 at ``n = 190``,
so the customary "PSI > 0.1 means drift" fires on more than a third of the
200-row windows of data that has not drifted at all.

The test. Baseline counts ``B`` (``n_B`` rows) and observed counts ``O``
(``n_O`` rows) are two samples; under no drift both are multinomial draws
from the same bin probabilities. The likelihood-ratio test of that hypothesis
(the G-test of homogeneity of the 2 x k table) is::

    G = 2 Σ_rows Σ_i count · ln(count / expected),  expected = row total · column share
      = 2 N · JS_π(O/n_O, B/n_B),  N = n_O + n_B,  π = (n_O / N, n_B / N)

the Jensen–Shannon divergence with weights proportional to the sample sizes,
and ``G ~ χ²(k - 1)`` under no drift. The baseline's own sampling error is in
the test (a one-sample test against the baseline shares would treat 5,000
baseline rows as the truth and over-alarm on large windows); that holds even
though the bin edges are the baseline's own quantiles, because the probability
mass between sample quantiles varies like a multinomial share. The test is
asymptotically exact and well calibrated when every bin expects a few counts;
a minimum ``n`` (default 500: 25 expected rows per bin with 20 bins) keeps it
there. Below it the verdict is ``not_enough_data``: merge more windows
(:func:`.windows.merge_until`) instead of guessing. Bins empty in both samples carry no
information and are dropped, with one degree of freedom each.

PSI and the equal-weight Jensen–Shannon divergence (in bits, 0 to 1) are
reported as effect sizes. PSI needs non-zero shares, so it is computed with
``smoothing`` pseudo-counts per bin. ``psi_threshold`` is the PSI a window of
this size would need to reach the same critical value — asymptotically
``n_eff · PSI ≈ χ²`` with ``n_eff = n_O n_B / (n_O + n_B)`` — which is what to
plot instead of a constant 0.1.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from protocol.drift.distributions import xlogy


def g_statistic(observed: npt.ArrayLike, baseline: npt.ArrayLike) -> tuple[float, int]:
    """The G-test of homogeneity of two count vectors: ``(G, degrees of freedom)``.

    Bins empty in both are dropped; ``df`` is the number of remaining bins minus one.
    """
    o = np.asarray(observed, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if o.shape != b.shape:
        raise ValueError(f"{o.size} observed bins against {b.size} baseline bins")
    keep = (o + b) > 0
    o, b = o[keep], b[keep]
    n_o, n_b = o.sum(), b.sum()
    if n_o == 0 or n_b == 0 or o.size < 2:
        return 0.0, max(int(o.size) - 1, 0)
    column = (o + b) / (n_o + n_b)
    g = 2.0 * float((xlogy(o, o / (n_o * column)) + xlogy(b, b / (n_b * column))).sum())
    return max(g, 0.0), int(o.size) - 1


def psi(observed: npt.ArrayLike, baseline: npt.ArrayLike, smoothing: float = 0.5) -> float:
    """Population stability index of the bin shares, ``smoothing`` pseudo-counts per bin."""
    o = np.asarray(observed, dtype=np.float64) + smoothing
    b = np.asarray(baseline, dtype=np.float64) + smoothing
    if o.shape != b.shape:
        raise ValueError(f"{o.size} observed bins against {b.size} baseline bins")
    p, q = o / o.sum(), b / b.sum()
    return float(((p - q) * np.log(p / q)).sum())


def jensen_shannon(observed: npt.ArrayLike, baseline: npt.ArrayLike) -> float:
    """Jensen–Shannon divergence of the two bin-share vectors, in bits (0 to 1)."""
    o = np.asarray(observed, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if o.shape != b.shape:
        raise ValueError(f"{o.size} observed bins against {b.size} baseline bins")
    if o.sum() == 0 or b.sum() == 0:
        return 0.0
    p, q = o / o.sum(), b / b.sum()
    m = 0.5 * (p + q)
    js = 0.5 * float(xlogy(p, p / np.where(m > 0, m, 1)).sum()) + 0.5 * float(
        xlogy(q, q / np.where(m > 0, m, 1)).sum()
    )
    return max(js / math.log(2.0), 0.0)


def g_many(
    o: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    n_o: npt.NDArray[np.float64],
    n_b: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """:func:`g_statistic` along the last axis: G and degrees of freedom."""
    total = o + b
    kept = (total > 0).sum(axis=-1)
    column = total / (n_o + n_b)
    g = 2.0 * (xlogy(o, o / (n_o * column)) + xlogy(b, b / (n_b * column))).sum(axis=-1)
    testable = (n_o[..., 0] > 0) & (n_b[..., 0] > 0) & (kept >= 2)
    return np.where(testable, np.maximum(g, 0.0), 0.0), np.maximum(kept - 1, 0).astype(np.int64)


def js_many(
    o: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    n_o: npt.NDArray[np.float64],
    n_b: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """:func:`jensen_shannon` along the last axis."""
    p = o / n_o
    q = b / n_b
    m = 0.5 * (p + q)
    js = 0.5 * xlogy(p, p / m).sum(axis=-1) + 0.5 * xlogy(q, q / m).sum(axis=-1)
    both = (n_o[..., 0] > 0) & (n_b[..., 0] > 0)
    return np.where(both, np.maximum(js / math.log(2.0), 0.0), 0.0)


def psi_many(
    o: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    real: npt.NDArray[np.bool_] | None,
    smoothing: float,
) -> npt.NDArray[np.float64]:
    """:func:`psi` along the last axis, with pseudo-counts only in the ``real`` bins."""
    pseudo = smoothing if real is None else smoothing * real
    o, b = o + pseudo, b + pseudo
    p = o / o.sum(axis=-1, keepdims=True)
    q = b / b.sum(axis=-1, keepdims=True)
    ratio = np.ones(np.broadcast_shapes(p.shape, q.shape))
    np.divide(p, q, out=ratio, where=True if real is None else real)  # padding: p = q = 0
    result: npt.NDArray[np.float64] = ((p - q) * np.log(ratio)).sum(axis=-1)
    return result
