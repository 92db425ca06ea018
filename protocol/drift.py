"""Feature drift on the baseline's bins, with a decision that accounts for sample size.

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
(:func:`merge_until`) instead of guessing. Bins empty in both samples carry no
information and are dropped, with one degree of freedom each.

The false-alarm rate holds on average over baselines. Every test of a feature
shares the one baseline sample, so a feature whose baseline happened to land
off the population's shares alarms somewhat more often than the rate, and
another less (on the sample data at 1 %: 0 % to about 3 % per feature, 1 %
overall); larger baselines narrow that spread.

What the bins cannot show. NaN and infinite values are counted apart from the
bins (``nan``), values outside the feature's valid range are counted inside
them (``out_of_range``), and a value beyond everything the baseline saw lands
in an open end bin among the baseline's own extremes. Three more tests per
feature read those:

- ``missing-values``: is the share of NaN among the rows above the
  baseline's? One-sided exact conditional test (Fisher's): given the NaN of
  both samples together, ``K``, the window's count is hypergeometric under no
  drift. A baseline with no NaN at all is a count of 0 with its own sampling
  error, so a window needs several NaN in a row count of a few hundred before
  it alarms (at ``n = 600`` against 5,000 clean baseline rows: 3).
- ``out-of-range``: the same test on the share of finite values outside the
  feature's valid range.
- ``new-range``: values beyond the baseline's maximum (minimum). A device
  counts them (``above_baseline``, ``below_baseline``). Under no drift the
  ``N = n_O + n_B`` values are exchangeable, so ``c`` or more of the window's
  values lie above every baseline value exactly when the ``c`` largest of
  the ``N`` are all the window's: ``P(C >= c) = Π_{i < c} (n_O - i) / (N - i)``
  (about ``1 / (n_B + 1)`` per window value; ties with the baseline's max
  only make it smaller, so the tail is exact or conservative). A summary that
  did not count them (a window of an older device, or an aggregate with one
  in it) still has its ``max``: it says whether there is one and the open top
  bin holds them all. The values in the top bin are exchangeable given its
  count ``t`` in the window and ``K`` in both, so the window holds the
  largest of the ``K`` with probability ``t / K``, and the p-value of "a value
  beyond the baseline's max and ``t`` or more in the top bin" is
  ``Σ_{s >= t} P(T = s | K) s / K = (n_O / N) P(T' >= t - 1)`` with ``T'``
  hypergeometric over ``N - 1`` rows, ``K - 1`` top values and ``n_O - 1``
  draws. That tail is far weaker on a few new values, since the top bin's
  count mixes them with the baseline's own, and stronger on a distribution
  that widens (more values in the top bin, few beyond): where the count is
  known both are taken, the smaller p-value doubled. The same at the
  bottom, and the smaller of the two sides doubled. A summary whose range
  lies inside the baseline's has no value beyond it, counted or not
  (:func:`count_beyond_baseline` fills that in, so windows merge with the
  counts of the others).

The false-alarm rate is per feature, split over its tests (Bonferroni, in the
shares of :data:`ALPHA_SHARES`): most to the distribution test, whose shifts
are subtle, a tenth to each of the others, which see a dead sensor or a new
category with p-values far below any level. Every test keeps the minimum
sample: rows (values and NaN) for ``missing-values``, values for the others.
Exact tails are summed term by term while the hypergeometric's variance is
at most 100; beyond that the signed root of the deviance, with a continuity
correction, is within a few per cent of the exact tail.

PSI and the equal-weight Jensen–Shannon divergence (in bits, 0 to 1) are
reported as effect sizes. PSI needs non-zero shares, so it is computed with
``smoothing`` pseudo-counts per bin. ``psi_threshold`` is the PSI a window of
this size would need to reach the same critical value — asymptotically
``n_eff · PSI ≈ χ²`` with ``n_eff = n_O n_B / (n_O + n_B)`` — which is what to
plot instead of a constant 0.1.

Many tests at once. :func:`feature_drift` is the reference, one feature at a
time. :func:`detect_drift` tests all the features of a window in one numpy
pass (:func:`drift_arrays`, each feature's counts padded with zeros to the
widest one's bins), and :func:`detect_drift_many` all the windows of a fleet
in one, returning arrays (:class:`DriftArrays`) rather than an object per
test. They agree with the reference to rounding; the p-values come from the
closed form of the chi-square tail for integer degrees of freedom
(:func:`chi2_sf_many`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from protocol.manifest import Baseline
from protocol.summary import FeatureSummary
from protocol.window import WindowAggregate, WindowSummary, merge_windows

DriftVerdict = Literal["not_enough_data", "no_drift", "drift"]
DriftReason = Literal["distribution", "missing-values", "out-of-range", "new-range"]

DEFAULT_MIN_N: Final = 500
DEFAULT_FALSE_ALARM_RATE: Final = 0.01
# The share of a feature's false-alarm rate each of its tests spends (they sum to 1).
ALPHA_SHARES: Final[dict[DriftReason, float]] = {
    "distribution": 0.7,
    "missing-values": 0.1,
    "out-of-range": 0.1,
    "new-range": 0.1,
}
REASONS: Final[tuple[DriftReason, ...]] = tuple(ALPHA_SHARES)

_Observed = TypeVar("_Observed", bound=WindowSummary | WindowAggregate)


class DriftPolicy(BaseModel):
    """How drift is decided: the minimum sample, the false-alarm rate, PSI smoothing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_n: int = Field(default=DEFAULT_MIN_N, ge=1, description="fewer values: not_enough_data")
    false_alarm_rate: float = Field(
        default=DEFAULT_FALSE_ALARM_RATE,
        gt=0.0,
        lt=0.5,
        description="probability of a drift verdict when nothing drifted, per feature "
        "(split over its tests by ALPHA_SHARES)",
    )
    smoothing: float = Field(default=0.5, gt=0.0, description="pseudo-count per bin for PSI")


class FeatureDrift(BaseModel):
    """The drift statistics and verdict of one feature."""

    model_config = ConfigDict(frozen=True)

    feature: int = Field(ge=0, description="index in manifest order")
    name: str | None = None
    verdict: DriftVerdict
    n: int = Field(description="observed finite values")
    baseline_n: int
    psi: float
    js: float = Field(description="Jensen-Shannon divergence of the bin shares, in bits")
    statistic: float = Field(description="G-test statistic, 2 N JS weighted by sample sizes")
    df: int
    threshold: float = Field(description="chi-square critical value at the false-alarm rate")
    p_value: float
    psi_threshold: float = Field(description="the PSI at which this window would alarm")
    distribution: DriftVerdict = Field(description="the verdict of the test on the bins")
    nan: int = Field(default=0, description="NaN or infinite values observed")
    baseline_nan: int = 0
    missing: DriftVerdict = Field(
        default="not_enough_data", description="is the share of NaN above the baseline's?"
    )
    missing_p_value: float = 1.0
    out_of_range: int = Field(default=0, description="values outside the valid range observed")
    baseline_out_of_range: int = 0
    out_of_range_verdict: DriftVerdict = Field(
        default="not_enough_data", description="is the share out of range above the baseline's?"
    )
    out_of_range_p_value: float = 1.0
    min: float | None = None
    max: float | None = None
    baseline_min: float | None = None
    baseline_max: float | None = None
    below_baseline: int | None = Field(
        default=None, description="values below the baseline's min observed; None: not counted"
    )
    above_baseline: int | None = Field(
        default=None, description="values above the baseline's max observed; None: not counted"
    )
    new_range: DriftVerdict = Field(
        default="not_enough_data", description="are there values beyond the baseline's min/max?"
    )
    new_range_p_value: float = 1.0

    @property
    def verdicts(self) -> dict[DriftReason, DriftVerdict]:
        """Each test's verdict; ``verdict`` is ``drift`` if any says so."""
        return {
            "distribution": self.distribution,
            "missing-values": self.missing,
            "out-of-range": self.out_of_range_verdict,
            "new-range": self.new_range,
        }

    @property
    def reasons(self) -> list[DriftReason]:
        """The tests that found drift."""
        return [r for r, v in self.verdicts.items() if v == "drift"]


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


def _xlogy(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``x * ln(y)`` with ``0 * ln(anything) = 0``, ``x`` and ``y`` broadcast."""
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape))
    np.log(y, out=out, where=x > 0)
    out *= x
    return out


# -- counts beyond the bins: exact one-sided tests ------------------------------------

# Exact hypergeometric tails while the variance is at most this (standard
# deviation 10): the terms summed reach 16 standard deviations past the count.
_EXACT_VARIANCE: Final = 100.0
_EXACT_TERMS: Final = 160
# Up to this many exact tails in one call are summed in plain Python.
_SCALAR_TAILS: Final = 64
_HALF_LOG_2PI: Final = 0.5 * math.log(2.0 * math.pi)


def _lgamma(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
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
    return _lgamma(a + 1.0) - _lgamma(b + 1.0) - _lgamma(a - b + 1.0)


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
        if few <= _SCALAR_TAILS:  # math.lgamma beats numpy's per-call overhead on a few
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
    deviance = 2.0 * _xlogy(cells, cells / expected).sum(axis=0)
    root = np.sqrt(np.maximum(deviance, 0.0) / 2.0)
    return 0.5 * np.fromiter(map(math.erfc, root.tolist()), np.float64, count=root.size)


def _excess_p(
    count_o: npt.NDArray[np.float64],
    rows_o: npt.NDArray[np.float64],
    count_b: npt.NDArray[np.float64],
    rows_b: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Is ``count_o / rows_o`` above ``count_b / rows_b``? Fisher's one-sided exact p-value."""
    if not count_o.any():  # none observed: never above
        return np.ones(np.broadcast_shapes(count_o.shape, rows_o.shape, rows_b.shape))
    return hypergeom_sf(count_o, count_o + count_b, rows_o, rows_o + rows_b)


def _beyond_p(
    beyond: npt.NDArray[np.bool_],
    t_o: npt.NDArray[np.float64],
    t_b: npt.NDArray[np.float64],
    n_o: npt.NDArray[np.float64],
    n_b: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """p-value of "a value beyond the baseline's extreme, and ``t_o`` or more in that end bin"."""
    if not beyond.any():
        return np.ones(np.broadcast_shapes(beyond.shape, t_o.shape, n_o.shape))
    beyond, t_o, t_b, n_o, n_b = np.broadcast_arrays(beyond, t_o, t_b, n_o, n_b)
    out = np.ones(beyond.shape)
    at = beyond & (t_o >= 1) & (n_b > 0)
    if at.any():
        to, tb, no, nb = t_o[at], t_b[at], n_o[at], n_b[at]
        total = no + nb
        out[at] = no / total * hypergeom_sf(to - 1.0, to + tb - 1.0, no - 1.0, total - 1.0)
    return out


def _beyond_count_p(
    count: npt.NDArray[np.float64], n_o: npt.NDArray[np.float64], n_b: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """``P(C >= count)``: ``count`` window values beyond every baseline value (NaN: 1)."""
    count, n_o, n_b = np.broadcast_arrays(count, n_o, n_b)
    out = np.ones(count.shape)
    with np.errstate(invalid="ignore"):
        at = (count >= 1) & (n_b > 0)
    few = int(np.count_nonzero(at))
    if not few:
        return out
    c, no, nb = count[at], n_o[at], n_b[at]
    if few <= _SCALAR_TAILS:  # math.lgamma beats numpy's per-call overhead on a few
        out[at] = [
            _beyond_count_p_one(x, y, z)
            for x, y, z in zip(c.tolist(), no.tolist(), nb.tolist(), strict=True)
        ]
    else:
        total = no + nb
        log_p = _lgamma(no + 1.0) - _lgamma(no - c + 1.0) - _lgamma(total + 1.0)
        out[at] = np.exp(log_p + _lgamma(total - c + 1.0))
    return out


def _either(
    end_bin: npt.NDArray[np.float64],
    counted: npt.NDArray[np.float64],
    count: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """One side's p-value: the end bin's, or with a count the smaller of both, doubled."""
    both = np.minimum(2.0 * np.minimum(end_bin, counted), 1.0)
    return np.where(np.isnan(count), end_bin, both)


@dataclass(frozen=True)
class _Tails:
    """What the bins leave out, observed and baseline, each shaped like the tests (or broadcast).

    ``min`` and ``max`` are NaN where the summary had none, ``below`` and
    ``above`` (the observed values beyond the baseline's range) where it did not count them.
    """

    nan: npt.NDArray[np.float64]
    out_of_range: npt.NDArray[np.float64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    below: npt.NDArray[np.float64]
    above: npt.NDArray[np.float64]
    baseline_nan: npt.NDArray[np.float64]
    baseline_out_of_range: npt.NDArray[np.float64]
    baseline_min: npt.NDArray[np.float64]
    baseline_max: npt.NDArray[np.float64]


def _tail_tests(
    o: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    top: npt.NDArray[np.intp],
    n_o: npt.NDArray[np.float64],
    n_b: npt.NDArray[np.float64],
    tails: _Tails | None,
    policy: DriftPolicy,
) -> dict[str, npt.NDArray[Any]]:
    """The missing-values, out-of-range and new-range tests: counts, p-values, verdicts."""
    shape = n_o.shape
    if tails is None:
        zero, none = np.zeros(shape), np.full(shape, math.nan)
        tails = _Tails(zero, zero, none, none, none, none, zero, zero, none, none)
    nan_o, nan_b = np.broadcast_to(tails.nan, shape), np.broadcast_to(tails.baseline_nan, shape)
    oor_o = np.broadcast_to(tails.out_of_range, shape)
    oor_b = np.broadcast_to(tails.baseline_out_of_range, shape)
    alpha = policy.false_alarm_rate
    rows_o, rows_b = n_o + nan_o, n_b + nan_b
    missing_p = _excess_p(nan_o, rows_o, nan_b, rows_b)
    oor_p = _excess_p(oor_o, n_o, oor_b, n_b)
    index = np.broadcast_to(top, shape)[..., None]
    t_o = np.take_along_axis(o, index, axis=-1)[..., 0]
    t_b = np.take_along_axis(np.broadcast_to(b, o.shape), index, axis=-1)[..., 0]
    with np.errstate(invalid="ignore"):  # NaN for a missing min or max: never beyond
        above = np.broadcast_to(tails.max > tails.baseline_max, shape)
        below = np.broadcast_to(tails.min < tails.baseline_min, shape)
    # A range inside the baseline's proves there is nothing beyond it, counted or not.
    above_c = np.where(above, np.broadcast_to(tails.above, shape), 0.0)
    below_c = np.where(below, np.broadcast_to(tails.below, shape), 0.0)
    high = _either(
        _beyond_p(above, t_o, t_b, n_o, n_b), _beyond_count_p(above_c, n_o, n_b), above_c
    )
    low = _either(
        _beyond_p(below, o[..., 0], np.broadcast_to(b, o.shape)[..., 0], n_o, n_b),
        _beyond_count_p(below_c, n_o, n_b),
        below_c,
    )
    new_range_p = np.minimum(2.0 * np.minimum(high, low), 1.0)
    enough = (n_o >= policy.min_n) & (n_b > 0)

    def verdict(
        tested: npt.NDArray[np.bool_], p: npt.NDArray[np.float64], reason: DriftReason
    ) -> npt.NDArray[np.int8]:
        """Verdict codes (:data:`_VERDICTS`): 0 not tested, 1 no drift, 2 drift."""
        code: npt.NDArray[np.int8] = tested * (1 + (p <= alpha * ALPHA_SHARES[reason]))
        return code.astype(np.int8)

    return {
        "nan": nan_o.astype(np.int64),
        "baseline_nan": nan_b.astype(np.int64),
        "missing": verdict((rows_o >= policy.min_n) & (rows_b > 0), missing_p, "missing-values"),
        "missing_p_value": missing_p,
        "out_of_range": oor_o.astype(np.int64),
        "baseline_out_of_range": oor_b.astype(np.int64),
        "out_of_range_verdict": verdict(enough, oor_p, "out-of-range"),
        "out_of_range_p_value": oor_p,
        "min": np.broadcast_to(tails.min, shape).astype(np.float64),
        "max": np.broadcast_to(tails.max, shape).astype(np.float64),
        "baseline_min": np.broadcast_to(tails.baseline_min, shape).astype(np.float64),
        "baseline_max": np.broadcast_to(tails.baseline_max, shape).astype(np.float64),
        "below_baseline": below_c,
        "above_baseline": above_c,
        "new_range": verdict(enough, new_range_p, "new-range"),
        "new_range_p_value": new_range_p,
    }


_VERDICTS: Final = np.array(["not_enough_data", "no_drift", "drift"])


def _overall(*codes: npt.NDArray[np.int8]) -> npt.NDArray[np.int8]:
    """``drift`` (2) if any test says so, ``no_drift`` (1) if all do, else 0."""
    most, least = np.maximum.reduce(codes), np.minimum.reduce(codes)
    result: npt.NDArray[np.int8] = np.where(most == 2, 2, np.where(least == 1, 1, 0)).astype(
        np.int8
    )
    return result


def _summary_tails(summaries: Sequence[FeatureSummary]) -> dict[str, npt.NDArray[np.float64]]:
    count = len(summaries)
    return {
        "nan": np.fromiter((f.nan for f in summaries), np.float64, count=count),
        "out_of_range": np.fromiter((f.out_of_range for f in summaries), np.float64, count=count),
        "min": np.fromiter(
            (math.nan if f.min is None else f.min for f in summaries), np.float64, count=count
        ),
        "max": np.fromiter(
            (math.nan if f.max is None else f.max for f in summaries), np.float64, count=count
        ),
        "below": np.fromiter(
            (math.nan if f.below_baseline is None else f.below_baseline for f in summaries),
            np.float64,
            count=count,
        ),
        "above": np.fromiter(
            (math.nan if f.above_baseline is None else f.above_baseline for f in summaries),
            np.float64,
            count=count,
        ),
    }


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
    g = 2.0 * float((_xlogy(o, o / (n_o * column)) + _xlogy(b, b / (n_b * column))).sum())
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
    js = 0.5 * float(_xlogy(p, p / np.where(m > 0, m, 1)).sum()) + 0.5 * float(
        _xlogy(q, q / np.where(m > 0, m, 1)).sum()
    )
    return max(js / math.log(2.0), 0.0)


def feature_drift(
    baseline: FeatureSummary,
    observed: FeatureSummary,
    policy: DriftPolicy | None = None,
    feature: int = 0,
    name: str | None = None,
) -> FeatureDrift:
    """Drift of one feature: statistics on the baseline bins and a sample-size-aware verdict."""
    policy = policy or DriftPolicy()
    if len(baseline.counts) != len(observed.counts):
        raise ValueError(
            f"feature {name or feature}: {len(observed.counts)} observed bins, "
            f"{len(baseline.counts)} in the baseline"
        )
    n_o, n_b = sum(observed.counts), sum(baseline.counts)
    g, df = g_statistic(observed.counts, baseline.counts)
    if df >= 1:
        threshold = chi2_quantile(1.0 - _distribution_alpha(policy), df)
        p_value = chi2_sf(g, df)
    else:
        threshold, p_value = math.inf, 1.0
    n_eff = n_o * n_b / (n_o + n_b) if n_o and n_b else 0.0
    if n_o < policy.min_n or n_b == 0:
        distribution: DriftVerdict = "not_enough_data"
    else:
        distribution = "drift" if g > threshold else "no_drift"
    values = _tail_tests_one(baseline, observed, n_o, n_b, policy)
    verdict = _overall_one(
        distribution, values["missing"], values["out_of_range_verdict"], values["new_range"]
    )
    return FeatureDrift(
        feature=feature,
        name=name,
        verdict=verdict,
        n=n_o,
        baseline_n=n_b,
        psi=psi(observed.counts, baseline.counts, policy.smoothing),
        js=jensen_shannon(observed.counts, baseline.counts),
        statistic=g,
        df=df,
        threshold=threshold,
        p_value=p_value,
        psi_threshold=threshold / n_eff if n_eff > 0 else math.inf,
        distribution=distribution,
        **values,
    )


def _log_choose_one(a: float, b: float) -> float:
    return math.lgamma(a + 1.0) - math.lgamma(b + 1.0) - math.lgamma(a - b + 1.0)


def _hypergeom_sf_one(x: float, k: float, n: float, pop: float) -> float:
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


def _beyond_count_p_one(count: float, n_o: float, n_b: float) -> float:
    """``P(C >= count)`` of :func:`_beyond_count_p`, in plain Python."""
    if count < 1 or n_b <= 0:
        return 1.0
    total = n_o + n_b
    log_p = math.lgamma(n_o + 1.0) - math.lgamma(n_o - count + 1.0) - math.lgamma(total + 1.0)
    return math.exp(log_p + math.lgamma(total - count + 1.0))


def _beyond_p_one(beyond: bool, t_o: float, t_b: float, n_o: float, n_b: float) -> float:
    if not beyond or t_o < 1 or n_b <= 0:
        return 1.0
    total = n_o + n_b
    return n_o / total * _hypergeom_sf_one(t_o - 1.0, t_o + t_b - 1.0, n_o - 1.0, total - 1.0)


def _tail_tests_one(
    baseline: FeatureSummary, observed: FeatureSummary, n_o: int, n_b: int, policy: DriftPolicy
) -> dict[str, Any]:
    """:func:`_tail_tests` of one feature, as :class:`FeatureDrift`'s fields."""
    alpha = policy.false_alarm_rate
    rows_o, rows_b = n_o + observed.nan, n_b + baseline.nan
    nan_o, nan_b = observed.nan, baseline.nan
    missing_p = _hypergeom_sf_one(nan_o, nan_o + nan_b, rows_o, rows_o + rows_b)
    oor_o, oor_b = observed.out_of_range, baseline.out_of_range
    oor_p = _hypergeom_sf_one(oor_o, oor_o + oor_b, n_o, n_o + n_b)
    counts_o, counts_b = observed.counts, baseline.counts
    hi_o, hi_b, lo_o, lo_b = observed.max, baseline.max, observed.min, baseline.min
    above = hi_o is not None and hi_b is not None and hi_o > hi_b
    below = lo_o is not None and lo_b is not None and lo_o < lo_b
    # A range inside the baseline's proves there is nothing beyond it, counted or not.
    above_c = observed.above_baseline if above else 0
    below_c = observed.below_baseline if below else 0
    high = _beyond_p_one(above, counts_o[-1], counts_b[-1], n_o, n_b)
    if above_c is not None:
        high = min(2.0 * min(high, _beyond_count_p_one(above_c, n_o, n_b)), 1.0)
    low = _beyond_p_one(below, counts_o[0], counts_b[0], n_o, n_b)
    if below_c is not None:
        low = min(2.0 * min(low, _beyond_count_p_one(below_c, n_o, n_b)), 1.0)
    new_range_p = min(2.0 * min(high, low), 1.0)
    enough = n_o >= policy.min_n and n_b > 0

    def verdict(tested: bool, p: float, reason: DriftReason) -> DriftVerdict:
        if not tested:
            return "not_enough_data"
        return "drift" if p <= alpha * ALPHA_SHARES[reason] else "no_drift"

    return {
        "nan": nan_o,
        "baseline_nan": nan_b,
        "missing": verdict(rows_o >= policy.min_n and rows_b > 0, missing_p, "missing-values"),
        "missing_p_value": missing_p,
        "out_of_range": oor_o,
        "baseline_out_of_range": oor_b,
        "out_of_range_verdict": verdict(enough, oor_p, "out-of-range"),
        "out_of_range_p_value": oor_p,
        "min": observed.min,
        "max": observed.max,
        "baseline_min": baseline.min,
        "baseline_max": baseline.max,
        "below_baseline": below_c,
        "above_baseline": above_c,
        "new_range": verdict(enough, new_range_p, "new-range"),
        "new_range_p_value": new_range_p,
    }


def _overall_one(*verdicts: DriftVerdict) -> DriftVerdict:
    if "drift" in verdicts:
        return "drift"
    return "no_drift" if all(v == "no_drift" for v in verdicts) else "not_enough_data"


def _distribution_alpha(policy: DriftPolicy) -> float:
    return policy.false_alarm_rate * ALPHA_SHARES["distribution"]


# -- many tests at once -----------------------------------------------------------------

_FEATURE_DRIFTS: Final = TypeAdapter(list[FeatureDrift])
_OPTIONAL_FLOATS: Final = frozenset(
    {"min", "max", "baseline_min", "baseline_max", "below_baseline", "above_baseline"}
)


@dataclass(frozen=True)
class DriftArrays:
    """The drift statistics and verdicts of many tests, each field an array of one shape.

    The last axis is the feature, in manifest order; the axes before it are the
    scopes stacked (windows, devices). Each entry is what :func:`feature_drift`
    gives for that feature and scope. ``arrays[i]`` holds the tests of scope
    ``i``, and :meth:`results` turns one scope's tests into :class:`FeatureDrift`.
    """

    verdict: npt.NDArray[np.str_]
    n: npt.NDArray[np.int64]
    baseline_n: npt.NDArray[np.int64]
    psi: npt.NDArray[np.float64]
    js: npt.NDArray[np.float64]
    statistic: npt.NDArray[np.float64]
    df: npt.NDArray[np.int64]
    threshold: npt.NDArray[np.float64]
    p_value: npt.NDArray[np.float64]
    psi_threshold: npt.NDArray[np.float64]
    distribution: npt.NDArray[np.str_]
    nan: npt.NDArray[np.int64]
    baseline_nan: npt.NDArray[np.int64]
    missing: npt.NDArray[np.str_]
    missing_p_value: npt.NDArray[np.float64]
    out_of_range: npt.NDArray[np.int64]
    baseline_out_of_range: npt.NDArray[np.int64]
    out_of_range_verdict: npt.NDArray[np.str_]
    out_of_range_p_value: npt.NDArray[np.float64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    baseline_min: npt.NDArray[np.float64]
    baseline_max: npt.NDArray[np.float64]
    below_baseline: npt.NDArray[np.float64]
    above_baseline: npt.NDArray[np.float64]
    new_range: npt.NDArray[np.str_]
    new_range_p_value: npt.NDArray[np.float64]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of every field: ``(scopes..., features)``."""
        return self.verdict.shape

    def __getitem__(self, index: int | slice | tuple[int | slice, ...]) -> DriftArrays:
        """Every field indexed by ``index``, as numpy indexes: ``arrays[i]`` is scope ``i``."""
        return DriftArrays(
            **{f.name: np.asarray(getattr(self, f.name)[index]) for f in dataclasses.fields(self)}
        )

    def results(self, names: Sequence[str] | None = None) -> list[FeatureDrift]:
        """One :class:`FeatureDrift` per feature, for the tests of one scope (a 1-D array)."""
        if self.verdict.ndim != 1:
            raise ValueError(f"results() takes the tests of one scope, not of shape {self.shape}")
        if names is not None and len(names) != self.verdict.size:
            raise ValueError(f"{len(names)} names for {self.verdict.size} features")
        fields = [f.name for f in dataclasses.fields(self)]  # named as FeatureDrift's
        columns = [getattr(self, name).tolist() for name in fields]
        for j, name in enumerate(fields):
            if name in _OPTIONAL_FLOATS:  # NaN stands for a summary without values
                columns[j] = [None if v != v else v for v in columns[j]]
        # One validation of the whole list is faster than one per object, and than
        # model_construct (Python, slower than pydantic-core for a model this small).
        return _FEATURE_DRIFTS.validate_python(
            [
                {
                    "feature": j,
                    "name": None if names is None else names[j],
                    **dict(zip(fields, values, strict=True)),
                }
                for j, values in enumerate(zip(*columns, strict=True))
            ]
        )


def drift_arrays(
    observed: npt.ArrayLike,
    baseline: npt.ArrayLike,
    bins: npt.ArrayLike | None = None,
    policy: DriftPolicy | None = None,
) -> DriftArrays:
    """:func:`feature_drift` of many count vectors at once, each against its baseline counts.

    ``observed`` holds ``[..., width]`` bin counts and ``baseline`` broadcasts
    against it (``[features, width]`` against ``[scopes, features, width]``).
    Features with fewer bins are padded with zeros up to ``width``, and ``bins``
    (broadcasting against the axes before the last) says how many leading
    entries of each row are bins; without it every entry is. Zero padding is a
    bin empty in both samples, which the G-test and Jensen–Shannon already
    drop; only PSI's pseudo-counts need to know where the bins end. Counts
    alone carry no NaN, no out-of-range values and no min or max: those tests
    see none (:func:`detect_drift_many` reads them from the summaries).
    """
    o = np.asarray(observed, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    width = np.broadcast_shapes(o.shape, b.shape)[-1:]
    if not width:
        raise ValueError("counts need an axis of bins")
    real = None
    if bins is not None:
        widths = np.asarray(bins)
        if widths.size and (widths.min() < 1 or widths.max() > width[0]):
            raise ValueError(f"bins must lie in 1..{width[0]}")
        real = np.arange(width[0]) < widths[..., None]
        if np.where(real, 0.0, o).any() or np.where(real, 0.0, b).any():
            raise ValueError("counts past a feature's bins must be zero")
    return _drift_arrays(o, b, real, policy or DriftPolicy())


def _drift_arrays(
    o: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    real: npt.NDArray[np.bool_] | None,
    policy: DriftPolicy,
    tails: _Tails | None = None,
) -> DriftArrays:
    n_o = o.sum(axis=-1, keepdims=True)
    n_b = b.sum(axis=-1, keepdims=True)
    # Padding and empty samples divide 0 by 0 in entries that are masked out.
    with np.errstate(divide="ignore", invalid="ignore"):
        g, df = _g_many(o, b, n_o, n_b)
        js = _js_many(o, b, n_o, n_b)
        psi_ = _psi_many(o, b, real, policy.smoothing)
        n_o, n_b = n_o[..., 0], n_b[..., 0]
        n_eff = np.where((n_o > 0) & (n_b > 0), n_o * n_b / (n_o + n_b), 0.0)
    threshold = _thresholds(df, _distribution_alpha(policy))
    p_value = np.ones(df.shape)
    tested = df >= 1
    p_value[tested] = chi2_sf_many(g[tested], df[tested])
    psi_threshold = np.full(df.shape, math.inf)
    np.divide(threshold, n_eff, out=psi_threshold, where=n_eff > 0)
    enough = (n_o >= policy.min_n) & (n_b > 0)
    distribution = (enough * (1 + (g > threshold))).astype(np.int8)  # codes of _VERDICTS
    top = (real.sum(axis=-1) if real is not None else np.full(o.shape[-2:-1], o.shape[-1])) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        shape = np.broadcast_shapes(n_o.shape, n_b.shape)
        tests = _tail_tests(
            np.broadcast_to(o, (*shape, o.shape[-1])),
            b,
            top,
            np.broadcast_to(n_o, shape),
            np.broadcast_to(n_b, shape),
            tails,
            policy,
        )
    codes = [distribution, tests["missing"], tests["out_of_range_verdict"], tests["new_range"]]
    for name in ("missing", "out_of_range_verdict", "new_range"):
        tests[name] = _VERDICTS[tests[name]]
    return DriftArrays(
        verdict=_VERDICTS[_overall(*codes)],
        n=np.broadcast_to(n_o, df.shape).astype(np.int64),
        baseline_n=np.broadcast_to(n_b, df.shape).astype(np.int64),
        psi=psi_,
        js=js,
        statistic=g,
        df=df,
        threshold=threshold,
        p_value=p_value,
        psi_threshold=psi_threshold,
        distribution=_VERDICTS[distribution],
        **tests,
    )


def _g_many(
    o: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    n_o: npt.NDArray[np.float64],
    n_b: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """:func:`g_statistic` along the last axis: G and degrees of freedom."""
    total = o + b
    kept = (total > 0).sum(axis=-1)
    column = total / (n_o + n_b)
    g = 2.0 * (_xlogy(o, o / (n_o * column)) + _xlogy(b, b / (n_b * column))).sum(axis=-1)
    testable = (n_o[..., 0] > 0) & (n_b[..., 0] > 0) & (kept >= 2)
    return np.where(testable, np.maximum(g, 0.0), 0.0), np.maximum(kept - 1, 0).astype(np.int64)


def _js_many(
    o: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    n_o: npt.NDArray[np.float64],
    n_b: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """:func:`jensen_shannon` along the last axis."""
    p = o / n_o
    q = b / n_b
    m = 0.5 * (p + q)
    js = 0.5 * _xlogy(p, p / m).sum(axis=-1) + 0.5 * _xlogy(q, q / m).sum(axis=-1)
    both = (n_o[..., 0] > 0) & (n_b[..., 0] > 0)
    return np.where(both, np.maximum(js / math.log(2.0), 0.0), 0.0)


def _psi_many(
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


def _thresholds(df: npt.NDArray[np.int64], false_alarm_rate: float) -> npt.NDArray[np.float64]:
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


class _BaselineBins:
    """A baseline's counts in a zero-padded ``[features, width]`` array, and where its bins sit."""

    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline
        self.bins = [len(f.summary.counts) for f in baseline.features]
        width = max(self.bins, default=1)
        self.real = np.arange(width) < np.asarray(self.bins, dtype=np.intp)[:, None]
        self.positions = np.flatnonzero(self.real)  # in the flattened array, bin after bin
        self.counts = self.pad([[f.summary for f in baseline.features]])[0]
        self.counts.flags.writeable = False
        self.tails = {
            f"baseline_{k}": v
            for k, v in _summary_tails([f.summary for f in baseline.features]).items()
            if k not in ("below", "above")  # counted against a baseline, not by one
        }

    def pad(self, scopes: Sequence[Sequence[FeatureSummary]]) -> npt.NDArray[np.float64]:
        """The bin counts of each scope's features, ``[scopes, features, width]``."""
        values = itertools.chain.from_iterable(f.counts for features in scopes for f in features)
        flat = np.fromiter(values, dtype=np.float64, count=len(scopes) * self.positions.size)
        out = np.zeros((len(scopes), self.real.size))
        out[:, self.positions] = flat.reshape(len(scopes), self.positions.size)
        return out.reshape(len(scopes), *self.real.shape)

    def problem(self, observed: WindowSummary | WindowAggregate) -> str | None:
        """Why ``observed`` cannot be tested against this baseline, or ``None``."""
        if observed.baseline_id != self.baseline.id:
            return f"the window counted in baseline {observed.baseline_id}, not {self.baseline.id}"
        if len(observed.features) != len(self.bins):
            return (
                f"the window has {len(observed.features)} features, the baseline {len(self.bins)}"
            )
        bins = [len(f.counts) for f in observed.features]
        if bins != self.bins:
            j = next(j for j, (a, b) in enumerate(zip(bins, self.bins, strict=True)) if a != b)
            return f"feature {j}: {bins[j]} observed bins, {self.bins[j]} in the baseline"
        return None


class _Same:
    """A cache key that is its object's identity: a pydantic model holding lists has no hash."""

    __slots__ = ("baseline",)

    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline

    def __hash__(self) -> int:
        return id(self.baseline)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.baseline is self.baseline


@functools.lru_cache(maxsize=64)
def _cached_bins(key: _Same) -> _BaselineBins:
    return _BaselineBins(key.baseline)


def _baseline_bins(baseline: Baseline) -> _BaselineBins:
    """The padded counts of ``baseline``, made once per baseline object (models are frozen)."""
    return _cached_bins(_Same(baseline))


def detect_drift_many(
    baseline: Baseline,
    windows: Sequence[WindowSummary | WindowAggregate],
    policy: DriftPolicy | None = None,
) -> DriftArrays:
    """Drift of every feature of every window (or aggregate) at once: ``[windows, features]``.

    ``detect_drift_many(baseline, ws, policy)[i].results(names)`` is
    ``detect_drift(baseline, ws[i], policy, names)``; the arrays let a caller
    that tests many scopes (every device of a fleet) look at verdicts and
    statistics without building an object per test.
    """
    bins = _baseline_bins(baseline)
    for i, w in enumerate(windows):
        problem = bins.problem(w)
        if problem is not None:
            raise ValueError(problem if len(windows) == 1 else f"window {i}: {problem}")
    seen = _summary_tails([f for w in windows for f in w.features])
    shape = (len(windows), len(bins.bins))
    tails = _Tails(**{k: v.reshape(shape) for k, v in seen.items()}, **bins.tails)
    return _drift_arrays(
        bins.pad([w.features for w in windows]),
        bins.counts,
        bins.real,
        policy or DriftPolicy(),
        tails,
    )


def detect_drift(
    baseline: Baseline,
    observed: WindowSummary | WindowAggregate,
    policy: DriftPolicy | None = None,
    names: Sequence[str] | None = None,
) -> list[FeatureDrift]:
    """Drift of every feature of ``observed`` against the bundle's ``baseline``.

    The results of :func:`feature_drift` feature by feature, computed for all
    features in one pass (:func:`detect_drift_many` of one window).
    """
    if names is not None and len(names) != len(baseline.features):
        raise ValueError(f"{len(names)} names for {len(baseline.features)} features")
    return detect_drift_many(baseline, [observed], policy)[0].results(names)


def count_beyond_baseline(baseline: Baseline, observed: _Observed) -> _Observed:
    """``observed`` with the counts beyond ``baseline``'s range that its own range proves.

    A feature that did not count the values below the baseline's min (above
    its max) but whose ``min`` (``max``) lies inside the baseline's has none
    there: its count is 0. Call it on each window before merging, so that a
    window that left the counts out (it had nothing beyond the range, or an
    older device wrote it) does not leave its aggregate without them. Other
    counts, and a window over another baseline, are returned as they are.
    """
    if observed.baseline_id != baseline.id or len(observed.features) != len(baseline.features):
        return observed
    features = list(observed.features)
    for j, (f, b) in enumerate(zip(features, baseline.features, strict=True)):
        below, above = f.below_baseline, f.above_baseline
        low, high = b.summary.min, b.summary.max
        if below is None and (f.min is None or low is None or f.min >= low):
            below = 0
        if above is None and (f.max is None or high is None or f.max <= high):
            above = 0
        if (below, above) != (f.below_baseline, f.above_baseline):
            features[j] = f.model_copy(update={"below_baseline": below, "above_baseline": above})
    if features == observed.features:
        return observed
    # model_copy keeps the type; mypy sees only the TypeVar's bound.
    return cast(_Observed, observed.model_copy(update={"features": features}))


def merge_until(
    windows: Iterable[WindowSummary | WindowAggregate],
    min_n: int = DEFAULT_MIN_N,
    pending: WindowAggregate | None = None,
    max_windows: int | None = None,
    baseline: Baseline | None = None,
) -> tuple[list[WindowAggregate], WindowAggregate | None]:
    """Merge consecutive windows into groups in which every feature has ``min_n`` values.

    Returns the completed groups and the group still short of ``min_n``; pass
    that back as ``pending`` with the next windows. A group also closes after
    ``max_windows`` windows, so a feature that is mostly NaN cannot hold the
    others back (its verdict is then ``not_enough_data``). With ``baseline``,
    each window first gets the counts beyond its range that its range proves
    (:func:`count_beyond_baseline`).
    """
    done: list[WindowAggregate] = []
    current = pending
    for w in windows:
        if baseline is not None:
            w = count_beyond_baseline(baseline, w)
        current = merge_windows([current, w]) if current is not None else merge_windows([w])
        full = all(f.n >= min_n for f in current.features)
        if full or (max_windows is not None and current.windows >= max_windows):
            done.append(current)
            current = None
    return done, current
