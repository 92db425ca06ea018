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
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from protocol.manifest import Baseline
from protocol.summary import FeatureSummary
from protocol.window import WindowAggregate, WindowSummary, merge_windows

DriftVerdict = Literal["not_enough_data", "no_drift", "drift"]

DEFAULT_MIN_N: Final = 500
DEFAULT_FALSE_ALARM_RATE: Final = 0.01


class DriftPolicy(BaseModel):
    """How drift is decided: the minimum sample, the false-alarm rate, PSI smoothing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_n: int = Field(default=DEFAULT_MIN_N, ge=1, description="fewer values: not_enough_data")
    false_alarm_rate: float = Field(
        default=DEFAULT_FALSE_ALARM_RATE,
        gt=0.0,
        lt=0.5,
        description="probability of a drift verdict when nothing drifted, per test",
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
        threshold = chi2_quantile(1.0 - policy.false_alarm_rate, df)
        p_value = chi2_sf(g, df)
    else:
        threshold, p_value = math.inf, 1.0
    n_eff = n_o * n_b / (n_o + n_b) if n_o and n_b else 0.0
    if n_o < policy.min_n or n_b == 0:
        verdict: DriftVerdict = "not_enough_data"
    else:
        verdict = "drift" if g > threshold else "no_drift"
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
    )


# -- many tests at once -----------------------------------------------------------------

_FEATURE_DRIFTS: Final = TypeAdapter(list[FeatureDrift])


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
    drop; only PSI's pseudo-counts need to know where the bins end.
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
    threshold = _thresholds(df, policy.false_alarm_rate)
    p_value = np.ones(df.shape)
    tested = df >= 1
    p_value[tested] = chi2_sf_many(g[tested], df[tested])
    psi_threshold = np.full(df.shape, math.inf)
    np.divide(threshold, n_eff, out=psi_threshold, where=n_eff > 0)
    enough = (n_o >= policy.min_n) & (n_b > 0)
    return DriftArrays(
        verdict=np.where(enough, np.where(g > threshold, "drift", "no_drift"), "not_enough_data"),
        n=np.broadcast_to(n_o, df.shape).astype(np.int64),
        baseline_n=np.broadcast_to(n_b, df.shape).astype(np.int64),
        psi=psi_,
        js=js,
        statistic=g,
        df=df,
        threshold=threshold,
        p_value=p_value,
        psi_threshold=psi_threshold,
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
    return _drift_arrays(
        bins.pad([w.features for w in windows]), bins.counts, bins.real, policy or DriftPolicy()
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


def merge_until(
    windows: Iterable[WindowSummary | WindowAggregate],
    min_n: int = DEFAULT_MIN_N,
    pending: WindowAggregate | None = None,
    max_windows: int | None = None,
) -> tuple[list[WindowAggregate], WindowAggregate | None]:
    """Merge consecutive windows into groups in which every feature has ``min_n`` values.

    Returns the completed groups and the group still short of ``min_n``; pass
    that back as ``pending`` with the next windows. A group also closes after
    ``max_windows`` windows, so a feature that is mostly NaN cannot hold the
    others back (its verdict is then ``not_enough_data``).
    """
    done: list[WindowAggregate] = []
    current = pending
    for w in windows:
        current = merge_windows([current, w]) if current is not None else merge_windows([w])
        full = all(f.n >= min_n for f in current.features)
        if full or (max_windows is not None and current.windows >= max_windows):
            done.append(current)
            current = None
    return done, current
