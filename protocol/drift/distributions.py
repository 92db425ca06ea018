"""The tails of the chi-square and hypergeometric distributions the tests read their p-values from.

For integer degrees of freedom the chi-square tail has a closed form
(:func:`chi2_sf_many`), which tests many statistics in one numpy pass.
Exact tails are summed term by term while the hypergeometric's variance is
at most 100; beyond that the signed root of the deviance, with a continuity
correction, is within a few per cent of the exact tail.
"""

from __future__ import annotations

import functools
import math
from typing import Final

import numpy as np
import numpy.typing as npt


def chi2_sf(x: float, df: int) -> float:
    """``P(X > x)`` for ``X ~ χ²(df)`` (the regularised upper incomplete gamma)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if x <= 0.0:
        return 1.0
    return _gamma_q(df / 2.0, x / 2.0)


@functools.lru_cache(maxsize=1024)
def chi2_quantile(p: float, df: int) -> float:
    """The ``x`` with ``P(X <= x) = p`` for ``X ~ χ²(df)``, to about 1e-10 relative."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    target = 1.0 - p
    lo, hi = 0.0, float(df)
    while chi2_sf(hi, df) > target:
        lo, hi = hi, hi * 2.0
    # Bisection: the survival function is monotone; 200 halvings is exact to
    # float precision and costs well under a millisecond.
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if chi2_sf(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _gamma_q(a: float, x: float) -> float:
    """Regularised upper incomplete gamma ``Q(a, x)`` (series or continued fraction)."""
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # Lentz's continued fraction for Q.
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return min(1.0, math.exp(log_prefix) * h)


def chi2_sf_many(x: npt.ArrayLike, df: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """:func:`chi2_sf` element by element, for arrays of statistics and integer ``df >= 1``.

    For integer ``df`` the survival function has a closed form in ``y = x / 2``:
    ``erfc(√y)`` (odd ``df`` only) plus ``Σ_{i < ⌊df/2⌋} e^{-y} y^{i+h} / Γ(i+h+1)``
    with ``h = 1/2`` for odd ``df`` and 0 for even — a few terms for the usual
    bin counts, where the series and continued fraction take tens of steps.
    Each term is taken from its logarithm, so no tail that a float can hold
    underflows on the way.
    """
    xs, d = np.asarray(x, dtype=np.float64), np.asarray(df, dtype=np.int64)
    if xs.shape != d.shape:
        xs, d = np.broadcast_arrays(xs, d)
    if d.size and d.min() < 1:
        raise ValueError("df must be >= 1")
    positive = xs > 0.0
    y = np.where(positive, xs / 2.0, 1.0)
    log_y = np.log(y)
    odd = d % 2 == 1
    total = np.zeros(y.shape)
    if odd.any():
        roots = np.sqrt(y[odd]).tolist()
        total[odd] = np.fromiter(map(math.erfc, roots), dtype=np.float64, count=len(roots))
    most = int(d.max(initial=0))
    if most >= 2:
        log_gamma = _poisson_log_gamma(most)[d]
        i = np.arange(log_gamma.shape[-1])
        log_first = 0.5 * odd * log_y - y  # ln(e^{-y} y^h)
        total += np.exp(i * log_y[..., None] + log_first[..., None] - log_gamma).sum(axis=-1)
    return np.where(positive, np.minimum(total, 1.0), 1.0)  # every term is >= 0


@functools.lru_cache(maxsize=16)
def _poisson_log_gamma(max_df: int) -> npt.NDArray[np.float64]:
    """``ln Γ(i + h + 1)`` of :func:`chi2_sf_many`'s terms, a row per df, +inf past its terms."""
    table = np.full((max_df + 1, max_df // 2), math.inf)
    for d in range(2, max_df + 1):
        h = 0.5 * (d % 2)
        table[d, : d // 2] = [math.lgamma(i + h + 1.0) for i in range(d // 2)]
    table.flags.writeable = False
    return table


def xlogy(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``x * ln(y)`` with ``0 * ln(anything) = 0``, ``x`` and ``y`` broadcast."""
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape))
    np.log(y, out=out, where=x > 0)
    out *= x
    return out


# Exact hypergeometric tails while the variance is at most this (standard
# deviation 10): the terms summed reach 16 standard deviations past the count.
_EXACT_VARIANCE: Final = 100.0
_EXACT_TERMS: Final = 160
# Up to this many exact tails in one call are summed in plain Python.
SCALAR_TAILS: Final = 64
_HALF_LOG_2PI: Final = 0.5 * math.log(2.0 * math.pi)


def lgamma(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``ln Γ(x)`` for ``x >= 1``, element by element: Stirling's series after shifting by 8."""
    y = x + 8.0
    shift = np.log(x * (x + 1.0) * (x + 2.0) * (x + 3.0)) + np.log(
        (x + 4.0) * (x + 5.0) * (x + 6.0) * (x + 7.0)
    )
    inv = 1.0 / y
    inv2 = inv * inv
    series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)))
    result: npt.NDArray[np.float64] = (y - 0.5) * np.log(y) - y + _HALF_LOG_2PI + series - shift
    return result


def _log_choose(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return lgamma(a + 1.0) - lgamma(b + 1.0) - lgamma(a - b + 1.0)


def hypergeom_sf(
    x: npt.ArrayLike, successes: npt.ArrayLike, draws: npt.ArrayLike, population: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """``P(X >= x)`` for ``X`` the successes among ``draws`` rows taken without replacement
    from ``population`` rows of which ``successes`` are successes, element by element.

    One-sided and conservative where it does not matter: at or below the mean
    (where the tail is about one half or more) it is 1. Exact term sums while
    the variance is at most 100; beyond, the signed root of the deviance with a
    continuity correction (:func:`_deviance_tail`).
    """
    xs, k, n, pop = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (x, successes, draws, population))
    )
    out = np.ones(xs.shape)
    if not xs.size:
        return out
    safe = np.maximum(pop, 1.0)
    mean = k * n / safe
    variance = mean * (pop - k) / safe * (pop - n) / np.maximum(pop - 1.0, 1.0)
    upper = (xs > mean) & (pop > 0)
    impossible = upper & (xs > np.minimum(k, n))
    out[impossible] = 0.0
    exact = upper & ~impossible & (variance <= _EXACT_VARIANCE)
    normal = upper & ~impossible & ~exact
    few = int(np.count_nonzero(exact))
    if few:
        xe, ke, ne, pe = xs[exact], k[exact], n[exact], pop[exact]
        if few <= SCALAR_TAILS:  # math.lgamma beats numpy's per-call overhead on a few
            log_first = np.array(
                [
                    _log_choose_one(a, b) + _log_choose_one(c - a, d - b) - _log_choose_one(c, d)
                    for a, b, c, d in zip(
                        ke.tolist(), xe.tolist(), pe.tolist(), ne.tolist(), strict=True
                    )
                ]
            )
        else:
            log_first = _log_choose(ke, xe) + _log_choose(pe - ke, ne - xe) - _log_choose(pe, ne)
        s = xe[:, None] + np.arange(_EXACT_TERMS - 1)  # pmf(s + 1) / pmf(s)
        ratio = (ke[:, None] - s) * (ne[:, None] - s)
        ratio /= (s + 1.0) * (pe[:, None] - ke[:, None] - ne[:, None] + s + 1.0)
        # Past min(successes, draws) the ratio is 0 once, so every later term is 0.
        terms = np.cumprod(np.maximum(ratio, 0.0), axis=1)
        out[exact] = np.minimum(np.exp(log_first) * (1.0 + terms.sum(axis=1)), 1.0)
    if normal.any():
        out[normal] = _deviance_tail(xs[normal], k[normal], n[normal], pop[normal])
    return out


def _deviance_tail(
    x: npt.NDArray[np.float64],
    k: npt.NDArray[np.float64],
    n: npt.NDArray[np.float64],
    pop: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """The upper tail from the signed root of the 2 x 2 table's deviance at ``x - 1/2``.

    Far more accurate in the tail than the plain normal approximation (within
    a few per cent of the exact tail down to 1e-8, on the conservative side).
    """
    a = x - 0.5
    cells = np.stack([a, k - a, n - a, pop - k - n + a])
    expected = np.stack([k * n, k * (pop - n), (pop - k) * n, (pop - k) * (pop - n)]) / pop
    deviance = 2.0 * xlogy(cells, cells / expected).sum(axis=0)
    root = np.sqrt(np.maximum(deviance, 0.0) / 2.0)
    return 0.5 * np.fromiter(map(math.erfc, root.tolist()), np.float64, count=root.size)


def _log_choose_one(a: float, b: float) -> float:
    return math.lgamma(a + 1.0) - math.lgamma(b + 1.0) - math.lgamma(a - b + 1.0)


def hypergeom_sf_one(x: float, k: float, n: float, pop: float) -> float:
    """:func:`hypergeom_sf` of one count, in plain Python (a numpy call per value costs more)."""
    if pop <= 0 or x <= k * n / pop:
        return 1.0
    if x > min(k, n):
        return 0.0
    mean = k * n / pop
    variance = mean * (pop - k) / pop * (pop - n) / max(pop - 1.0, 1.0)
    if variance > _EXACT_VARIANCE:
        return float(
            _deviance_tail(np.array([x]), np.array([k]), np.array([n]), np.array([pop]))[0]
        )
    log_first = _log_choose_one(k, x) + _log_choose_one(pop - k, n - x) - _log_choose_one(pop, n)
    term = total = 1.0
    s = x
    for _ in range(_EXACT_TERMS - 1):
        ratio = (k - s) * (n - s) / ((s + 1.0) * (pop - k - n + s + 1.0))
        term *= max(ratio, 0.0)
        total += term
        if term <= total * 1e-14:  # the ratios only fall: the rest adds nothing
            break
        s += 1.0
    return min(math.exp(log_first) * total, 1.0)


def chi2_thresholds(df: npt.NDArray[np.int64], false_alarm_rate: float) -> npt.NDArray[np.float64]:
    """The chi-square critical value of each ``df`` (infinite below 1)."""
    table = _threshold_table(false_alarm_rate, int(df.max(initial=0)))
    result: npt.NDArray[np.float64] = table[df]
    return result


@functools.lru_cache(maxsize=64)
def _threshold_table(false_alarm_rate: float, max_df: int) -> npt.NDArray[np.float64]:
    table = np.array(
        [math.inf] + [chi2_quantile(1.0 - false_alarm_rate, d) for d in range(1, max_df + 1)]
    )
    table.flags.writeable = False
    return table
