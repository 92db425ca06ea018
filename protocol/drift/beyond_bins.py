"""The missing-values, out-of-range and new-range tests: what the bins cannot show.

NaN and infinite values are counted apart from the bins (``nan``), values
outside the feature's valid range are counted inside them (``out_of_range``),
and a value beyond everything the baseline saw lands in an open end bin among
the baseline's own extremes. Three more tests per feature read those:

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
  (:func:`.windows.count_beyond_baseline` fills that in, so windows merge with the
  counts of the others).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.drift.distributions import SCALAR_TAILS, hypergeom_sf, hypergeom_sf_one, lgamma
from protocol.drift.model import ALPHA_SHARES, DriftPolicy, DriftReason, DriftVerdict
from protocol.summary import FeatureSummary


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
    if few <= SCALAR_TAILS:  # math.lgamma beats numpy's per-call overhead on a few
        out[at] = [
            _beyond_count_p_one(x, y, z)
            for x, y, z in zip(c.tolist(), no.tolist(), nb.tolist(), strict=True)
        ]
    else:
        total = no + nb
        log_p = lgamma(no + 1.0) - lgamma(no - c + 1.0) - lgamma(total + 1.0)
        out[at] = np.exp(log_p + lgamma(total - c + 1.0))
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
class Tails:
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


def tail_tests(
    o: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    top: npt.NDArray[np.intp],
    n_o: npt.NDArray[np.float64],
    n_b: npt.NDArray[np.float64],
    tails: Tails | None,
    policy: DriftPolicy,
) -> dict[str, npt.NDArray[Any]]:
    """The missing-values, out-of-range and new-range tests: counts, p-values, verdicts."""
    shape = n_o.shape
    if tails is None:
        zero, none = np.zeros(shape), np.full(shape, math.nan)
        tails = Tails(zero, zero, none, none, none, none, zero, zero, none, none)
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
        """Verdict codes: 0 not tested, 1 no drift, 2 drift (as ``detect`` reads them)."""
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


def summary_tails(summaries: Sequence[FeatureSummary]) -> dict[str, npt.NDArray[np.float64]]:
    """Each field beyond the bins of ``summaries`` as an array, NaN where it is ``None``."""

    def column(values: Iterable[float | None]) -> npt.NDArray[np.float64]:
        return np.fromiter(
            (math.nan if v is None else v for v in values), np.float64, len(summaries)
        )

    return {
        "nan": column(f.nan for f in summaries),
        "out_of_range": column(f.out_of_range for f in summaries),
        "min": column(f.min for f in summaries),
        "max": column(f.max for f in summaries),
        "below": column(f.below_baseline for f in summaries),
        "above": column(f.above_baseline for f in summaries),
    }


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
    return n_o / total * hypergeom_sf_one(t_o - 1.0, t_o + t_b - 1.0, n_o - 1.0, total - 1.0)


def tail_tests_one(
    baseline: FeatureSummary, observed: FeatureSummary, n_o: int, n_b: int, policy: DriftPolicy
) -> dict[str, Any]:
    """:func:`tail_tests` of one feature, as :class:`FeatureDrift`'s fields."""
    alpha = policy.false_alarm_rate
    rows_o, rows_b = n_o + observed.nan, n_b + baseline.nan
    nan_o, nan_b = observed.nan, baseline.nan
    missing_p = hypergeom_sf_one(nan_o, nan_o + nan_b, rows_o, rows_o + rows_b)
    oor_o, oor_b = observed.out_of_range, baseline.out_of_range
    oor_p = hypergeom_sf_one(oor_o, oor_o + oor_b, n_o, n_o + n_b)
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
