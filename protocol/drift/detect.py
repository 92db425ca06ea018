"""Every test of every feature at once, and one feature at a time for reference.

:func:`feature_drift` is the reference, one feature at a time.
:func:`detect_drift` tests all the features of a window in one numpy pass
(:func:`drift_arrays`, each feature's counts padded with zeros to the widest
one's bins), and :func:`detect_drift_many` all the windows of a fleet in one,
returning arrays (:class:`DriftArrays`) rather than an object per test. They
agree with the reference to rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from pydantic import TypeAdapter

from protocol.drift.beyond_bins import Tails, summary_tails, tail_tests, tail_tests_one
from protocol.drift.bins import g_many, g_statistic, jensen_shannon, js_many, psi, psi_many
from protocol.drift.distributions import chi2_quantile, chi2_sf, chi2_sf_many, chi2_thresholds
from protocol.drift.model import ALPHA_SHARES, DriftPolicy, DriftVerdict, FeatureDrift
from protocol.manifest import Baseline
from protocol.summary import FeatureSummary
from protocol.window import WindowAggregate, WindowSummary


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
    values = tail_tests_one(baseline, observed, n_o, n_b, policy)
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


def _overall_one(*verdicts: DriftVerdict) -> DriftVerdict:
    if "drift" in verdicts:
        return "drift"
    return "no_drift" if all(v == "no_drift" for v in verdicts) else "not_enough_data"


def _distribution_alpha(policy: DriftPolicy) -> float:
    return policy.false_alarm_rate * ALPHA_SHARES["distribution"]


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
    tails: Tails | None = None,
) -> DriftArrays:
    n_o = o.sum(axis=-1, keepdims=True)
    n_b = b.sum(axis=-1, keepdims=True)
    # Padding and empty samples divide 0 by 0 in entries that are masked out.
    with np.errstate(divide="ignore", invalid="ignore"):
        g, df = g_many(o, b, n_o, n_b)
        js = js_many(o, b, n_o, n_b)
        psi_ = psi_many(o, b, real, policy.smoothing)
        n_o, n_b = n_o[..., 0], n_b[..., 0]
        n_eff = np.where((n_o > 0) & (n_b > 0), n_o * n_b / (n_o + n_b), 0.0)
    threshold = chi2_thresholds(df, _distribution_alpha(policy))
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
        tests = tail_tests(
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


_VERDICTS: Final = np.array(["not_enough_data", "no_drift", "drift"])


def _overall(*codes: npt.NDArray[np.int8]) -> npt.NDArray[np.int8]:
    """``drift`` (2) if any test says so, ``no_drift`` (1) if all do, else 0."""
    most, least = np.maximum.reduce(codes), np.minimum.reduce(codes)
    result: npt.NDArray[np.int8] = np.where(most == 2, 2, np.where(least == 1, 1, 0)).astype(
        np.int8
    )
    return result


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
            for k, v in summary_tails([f.summary for f in baseline.features]).items()
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
def _baseline_bins(key: _Same) -> _BaselineBins:
    """The padded counts of a baseline, made once per baseline object (models are frozen)."""
    return _BaselineBins(key.baseline)


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
    bins = _baseline_bins(_Same(baseline))
    for i, w in enumerate(windows):
        problem = bins.problem(w)
        if problem is not None:
            raise ValueError(problem if len(windows) == 1 else f"window {i}: {problem}")
    seen = summary_tails([f for w in windows for f in w.features])
    shape = (len(windows), len(bins.bins))
    tails = Tails(**{k: v.reshape(shape) for k, v in seen.items()}, **bins.tails)
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
