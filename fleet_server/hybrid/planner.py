"""The hybrid planner: split the cloud's capacity across devices, then pick each device's tau.

Pure and vectorised over the fleet (100,000 devices in well under a second):
no I/O, no per-device Python loop on the hot path.

Inputs per device (:class:`FleetDemand`, one array entry per device):
request rate (requests a second, from its windows), weight (priority), the
histogram of its calibrated confidence in
:data:`protocol.hybrid.CONFIDENCE_BINS` bins (from its windows' hybrid
sections, or its top-score histogram before it has any), whether it opted out
(data must not leave it), and its link (share of cloud calls that failed,
cloud latency p95).

1. Capacity: the cloud serves ``capacity`` requests a second; the planner hands
   out ``capacity * (1 - headroom)``.
2. Demand: a device can use at most what escalating every request would send
   (its rate); an opted-out device, or one whose link fails (error share above
   ``max_link_errors``) or is too slow (p95 above ``max_link_latency_ms``),
   demands nothing and is planned ``local``. An unknown link (NaN) is taken
   as good: a device learns its link only by using it.
3. Shares by weighted max-min fairness (water-filling): every device gets
   ``min(demand, level * weight)`` with the single ``level`` at which the
   shares sum to the capacity handed out (or every demand is met; the level
   is then the smallest that meets them all). The level is found exactly:
   sort ``demand / weight``; at the k-th smallest ratio the devices before it
   are met and the rest get ``level * weight``, so the level is
   ``(capacity - met demand) / remaining weight`` at the first ratio where
   that hands out all the capacity.
4. A device that served no request (rate 0) demands nothing and is planned
   ``local`` (reason ``no_requests``) — unless ``bootstrap_rate`` > 0 and
   capacity is left once every demand is met: then it is planned
   ``escalate`` with tau = 1 and a share of at most ``bootstrap_rate`` of
   what is left, so a device that starts serving can reach the cloud before
   the next plan; its quota bounds what it sends, and its expected offload
   is 1 (every request, up to the quota: a device that then serves more
   than its quota is seen off its plan and re-planned with a rate).
5. Audits: a share ``audit_rate`` of the confident requests is also sent; a
   device's audit rate is at most its share ``s = share / rate`` (so audits
   alone never exceed it). The escalated fraction ``f`` then solves
   ``f + a * (1 - f) = s``: ``f = (s - a) / (1 - a)``, clamped to [0, 1].
6. tau: the ``f``-quantile of the device's calibrated confidence histogram
   (equal bins over [0, 1], confidence spread evenly inside a bin, so the
   histogram's CDF is linear inside each bin): the smallest tau below which
   a fraction ``f`` of its requests fall. A device without a histogram yet
   is assumed uniform (tau = f): real confidence leans towards 1, so this
   escalates no more than planned until it reports, and its quota bounds
   it in any case. ``expected_offload`` is the histogram's mass below tau
   plus the audits of the rest: ``s`` for a device planned ``escalate``.
7. Mode: ``local`` when the share is 0; ``cloud_first`` (tau = 1, no audits:
   nothing is answered locally to compare) when the share covers the whole
   rate and ``cloud_first_when_covered`` says so; otherwise ``escalate``
   (tau = 1 when the share covers the rate).
8. Quota: rate = share (never above the device's demand), burst =
   ``max(1, ceil(share * burst_seconds))``; 0 and 0 for a device planned
   ``local``.

Also here: :func:`jain_index` and :func:`weighted_fairness`, which say how
evenly a split (planned or observed) treats the devices it bottlenecks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleet_server.errors import Invalid
from protocol.hybrid import CONFIDENCE_BINS, PLAN_MODES

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

LOCAL: Final = np.int8(PLAN_MODES.index("local"))
ESCALATE: Final = np.int8(PLAN_MODES.index("escalate"))
CLOUD_FIRST: Final = np.int8(PLAN_MODES.index("cloud_first"))

# Why a device got the plan it got; FleetPlan.reason indexes this.
PLAN_REASONS: Final[tuple[str, ...]] = (
    "shared",  # it has a share of the cloud (escalate or cloud_first)
    "opted_out",  # its data must not leave it
    "link_errors",  # its cloud calls fail more than max_link_errors
    "link_latency",  # its cloud latency p95 is above max_link_latency_ms
    "no_requests",  # it served no request (rate 0) and got no bootstrap share
    "no_capacity",  # it demands, but the capacity handed out is 0
    "bootstrap",  # rate 0, planned escalate on capacity left over (bootstrap_rate)
)
_SHARED, _OPTED_OUT, _LINK_ERRORS, _LINK_LATENCY, _NO_REQUESTS, _NO_CAPACITY, _BOOTSTRAP = (
    np.int8(i) for i in range(len(PLAN_REASONS))
)


class PlanInputError(Invalid, ValueError):
    """The planner's inputs are inconsistent or out of range (the message names which)."""


@dataclass(frozen=True)
class PlannerSettings:
    """The fleet-wide knobs of a planning run."""

    capacity: float  # requests a second the cloud endpoint serves (C)
    headroom: float = 0.1  # share of C held back
    audit_rate: float = 0.02
    max_link_errors: float = 0.2
    max_link_latency_ms: float = 1000.0
    burst_seconds: float = 2.0
    cloud_first_when_covered: bool = False
    bootstrap_rate: float = 0.0  # requests a second for a device with no rate yet (0: local)

    def __post_init__(self) -> None:
        checks = (
            (math.isfinite(self.capacity) and self.capacity >= 0, "capacity must be >= 0"),
            (0 <= self.headroom < 1, "headroom must be in [0, 1)"),
            (0 <= self.audit_rate < 1, "audit_rate must be in [0, 1)"),
            (self.max_link_errors >= 0, "max_link_errors must be >= 0"),
            (self.max_link_latency_ms > 0, "max_link_latency_ms must be > 0"),
            (
                math.isfinite(self.burst_seconds) and self.burst_seconds > 0,
                "burst_seconds must be > 0",
            ),
            (
                math.isfinite(self.bootstrap_rate) and self.bootstrap_rate >= 0,
                "bootstrap_rate must be >= 0",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise PlanInputError(f"planner settings refused: {message}")

    @property
    def handed_out(self) -> float:
        """The capacity split across devices: ``capacity * (1 - headroom)``."""
        return self.capacity * (1.0 - self.headroom)


@dataclass(frozen=True)
class FleetDemand:
    """One entry per device, in the same order in every array."""

    device_ids: list[str]
    rate: Floats  # requests a second
    weight: Floats  # > 0
    confidence: npt.NDArray[Any]  # [devices, CONFIDENCE_BINS] counts
    opted_out: Bools
    link_errors: Floats  # share of cloud calls that failed, 0..1 (NaN when unknown)
    link_latency_ms: Floats  # cloud latency p95, NaN when unknown


def _empty() -> Floats:
    return np.zeros(0)


@dataclass(frozen=True)
class FleetPlan:
    """The planner's answer, in the demand's device order.

    ``demand`` and ``reason`` are always filled by :func:`plan_fleet` (their
    defaults only keep the type constructible as before they were added).
    """

    mode: npt.NDArray[np.int8]  # index into protocol.hybrid.PLAN_MODES
    share: Floats  # cloud requests a second granted
    tau: Floats
    quota_rate: Floats
    quota_burst: npt.NDArray[np.int64]
    audit_rate: Floats
    expected_offload: Floats  # expected share of the device's requests sent to the cloud
    level: float  # the water level of the weighted max-min split
    demand: Floats = field(default_factory=_empty)  # what each device could use (0 if local)
    reason: npt.NDArray[np.int8] = field(  # index into PLAN_REASONS
        default_factory=lambda: np.zeros(0, dtype=np.int8)
    )

    def bottlenecked(self) -> Bools:
        """The devices whose demand the split does not meet (they got ``level * weight``)."""
        out: Bools = self.share < self.demand
        return out


def _refuse_bad(bad: Bools, ids: list[str], what: str) -> None:
    if bool(np.any(bad)):
        first = int(np.argmax(bad))
        raise PlanInputError(
            f"planning refused: {int(np.count_nonzero(bad))} device(s) with {what}, "
            f"the first {ids[first]!r}"
        )


def _checked(
    demand: FleetDemand,
) -> tuple[Floats, Floats, npt.NDArray[Any], Bools, Floats, Floats]:
    n = len(demand.device_ids)
    rate = np.asarray(demand.rate, dtype=np.float64)
    weight = np.asarray(demand.weight, dtype=np.float64)
    counts = np.asarray(demand.confidence)
    opted_out = np.asarray(demand.opted_out, dtype=np.bool_)
    link_errors = np.asarray(demand.link_errors, dtype=np.float64)
    latency = np.asarray(demand.link_latency_ms, dtype=np.float64)
    for name, a in (
        ("rate", rate),
        ("weight", weight),
        ("opted_out", opted_out),
        ("link_errors", link_errors),
        ("link_latency_ms", latency),
    ):
        if a.shape != (n,):
            raise PlanInputError(
                f"planning refused: {name} has shape {a.shape}, expected ({n},) for {n} devices"
            )
    if counts.shape != (n, CONFIDENCE_BINS):
        raise PlanInputError(
            f"planning refused: confidence has shape {counts.shape}, "
            f"expected ({n}, {CONFIDENCE_BINS})"
        )
    ids = demand.device_ids
    _refuse_bad(~(np.isfinite(rate) & (rate >= 0)), ids, "a rate that is not a finite number >= 0")
    _refuse_bad(~(np.isfinite(weight) & (weight > 0)), ids, "a weight that is not finite and > 0")
    if counts.dtype.kind not in "iuf":
        raise PlanInputError(f"planning refused: confidence counts of type {counts.dtype}")
    # Integer counts are finite by their type; only their sign needs a look.
    bad_counts = np.any(counts < 0, axis=1)
    if counts.dtype.kind == "f":
        bad_counts |= ~np.all(np.isfinite(counts), axis=1)
    _refuse_bad(bad_counts, ids, "confidence counts that are not finite and >= 0")
    _refuse_bad(link_errors < 0, ids, "a negative link error share")
    _refuse_bad(latency < 0, ids, "a negative link latency")
    return rate, weight, counts, opted_out, link_errors, latency


def water_level(demand: Floats, weight: Floats, capacity: float) -> float:
    """The level of the weighted max-min split of ``capacity`` over ``demand``.

    Every device then gets ``min(demand, level * weight)``. When the demands
    fit in ``capacity`` the level is the smallest that meets them all
    (``max(demand / weight)``, 0 when nobody demands); otherwise the shares
    sum to ``capacity`` exactly (up to rounding).
    """
    active = demand > 0
    d = demand[active]
    if d.size == 0:
        return 0.0
    w = weight[active]
    ratio = d / w
    if float(d.sum()) <= capacity:
        return float(ratio.max())
    order = np.argsort(ratio, kind="stable")
    ratio, d, w = ratio[order], d[order], w[order]
    met_before = np.concatenate(([0.0], np.cumsum(d)[:-1]))  # demand of devices before k
    weight_from = np.cumsum(w[::-1])[::-1]  # weight of device k and after
    handed = met_before + ratio * weight_from  # what level = ratio[k] hands out (non-decreasing)
    k = int(np.searchsorted(handed, capacity, side="left"))
    k = min(k, d.size - 1)  # rounding only: handed[-1] == sum(d) > capacity
    return max(0.0, float((capacity - met_before[k]) / weight_from[k]))


def confidence_quantile(counts: npt.NDArray[Any], fraction: Floats) -> Floats:
    """Per device, the smallest tau with a share ``fraction`` of its confidence below it.

    ``counts`` is ``[devices, CONFIDENCE_BINS]`` over equal bins of [0, 1];
    inside a bin the confidence is taken as evenly spread (the CDF is linear
    there). A device with no counts is taken as uniform: tau = fraction.
    ``fraction`` is clamped to [0, 1]; 0 gives 0 and 1 gives 1.
    """
    f = np.clip(np.asarray(fraction, dtype=np.float64), 0.0, 1.0)
    return _quantile(_running_sums(np.asarray(counts)), f)


def mass_below(counts: npt.NDArray[Any], tau: Floats) -> Floats:
    """Per device, the share of its confidence histogram below ``tau`` (uniform if empty)."""
    t = np.clip(np.asarray(tau, dtype=np.float64), 0.0, 1.0)
    return _mass_below(_running_sums(np.asarray(counts)), t)


def _running_sums(counts: npt.NDArray[Any]) -> Floats:
    """Each row's running sum, as floats."""
    if counts.dtype.kind in "iu":
        # Summed in integers (exact, and several times faster than casting on the fly).
        out: Floats = np.cumsum(counts, axis=1).astype(np.float64)
        return out
    summed: Floats = np.cumsum(counts, axis=1, dtype=np.float64)
    return summed


def _quantile(cum: Floats, f: Floats) -> Floats:
    """:func:`confidence_quantile` from the histograms' running sums (``f`` in [0, 1])."""
    rows = np.arange(cum.shape[0])
    bins = cum.shape[1]
    total = cum[:, -1] if bins else np.zeros(cum.shape[0])
    target = f * total
    # The first bin whose running sum reaches the target holds the quantile.
    k = np.minimum(np.count_nonzero(cum < target[:, None], axis=1), bins - 1)
    below = np.where(k > 0, cum[rows, np.maximum(k - 1, 0)], 0.0)
    mass = cum[rows, k] - below
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = np.where(mass > 0, (target - below) / mass, 0.0)
    tau = (k + np.clip(inside, 0.0, 1.0)) / bins
    tau = np.where(total > 0, tau, f)
    out: Floats = np.clip(np.where(f <= 0.0, 0.0, np.where(f >= 1.0, 1.0, tau)), 0.0, 1.0)
    return out


def _mass_below(cum: Floats, t: Floats) -> Floats:
    """:func:`mass_below` from the histograms' running sums (``t`` in [0, 1])."""
    rows = np.arange(cum.shape[0])
    bins = cum.shape[1]
    total = cum[:, -1] if bins else np.zeros(cum.shape[0])
    position = t * bins
    k = np.minimum(np.floor(position).astype(np.intp), bins - 1)
    below = np.where(k > 0, cum[rows, np.maximum(k - 1, 0)], 0.0)
    inside = np.clip(position - k, 0.0, 1.0) * (cum[rows, k] - below)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, (below + inside) / total, t)
    out: Floats = np.clip(share, 0.0, 1.0)
    return out


def plan_fleet(demand: FleetDemand, settings: PlannerSettings) -> FleetPlan:
    """Plan every device of ``demand`` under ``settings`` (see the module's rules)."""
    rate, weight, counts, opted_out, link_errors, latency = _checked(demand)
    n = rate.size
    capacity = settings.handed_out

    # Rule 2: who may use the cloud, and why the others may not (first reason wins).
    reason = np.full(n, _SHARED, dtype=np.int8)
    reason[rate <= 0] = _NO_REQUESTS
    reason[latency > settings.max_link_latency_ms] = _LINK_LATENCY  # NaN compares False
    reason[link_errors > settings.max_link_errors] = _LINK_ERRORS
    reason[opted_out] = _OPTED_OUT
    eligible = reason == _SHARED
    wanted = np.where(eligible, rate, 0.0)

    # Rule 3: the weighted max-min split.
    level = water_level(wanted, weight, capacity)
    share = np.minimum(wanted, level * weight)
    reason[eligible & (share <= 0)] = _NO_CAPACITY

    # Rule 4: what is left once every demand is met, for devices with no rate yet.
    if settings.bootstrap_rate > 0:
        waiting = reason == _NO_REQUESTS
        left = capacity - float(share.sum())
        count = int(np.count_nonzero(waiting))
        if count and left > 0:
            share[waiting] = min(settings.bootstrap_rate, left / count)
            reason[waiting] = _BOOTSTRAP

    # Rules 5-7: audits, the escalated fraction, tau, the mode.
    served = share > 0
    bootstrap = reason == _BOOTSTRAP
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(rate > 0, np.minimum(share / rate, 1.0), 0.0)
    covered = served & ~bootstrap & (share >= wanted)
    mode = np.where(served, ESCALATE, LOCAL).astype(np.int8)
    if settings.cloud_first_when_covered:
        mode[covered] = CLOUD_FIRST
    escalating = (mode == ESCALATE) & ~bootstrap
    audit = np.where(escalating, np.minimum(settings.audit_rate, s), 0.0)
    f = np.clip((s - audit) / (1.0 - audit), 0.0, 1.0)
    f = np.where(covered | bootstrap, 1.0, np.where(served, f, 0.0))
    # tau is 0 (1) where f is 0 (1) whatever the histogram; read only the others'.
    tau = np.where(f >= 1.0, 1.0, 0.0)
    below = tau.copy()
    inside = np.flatnonzero((f > 0.0) & (f < 1.0))
    cum = _running_sums(counts[inside])
    tau[inside] = _quantile(cum, f[inside])
    below[inside] = _mass_below(cum, tau[inside])
    expected = np.where(served, below + audit * (1.0 - below), 0.0)

    # Rule 8: the quota.
    burst = np.where(served, np.maximum(1, np.ceil(share * settings.burst_seconds)), 0)
    return FleetPlan(
        mode=mode,
        share=share,
        tau=tau,
        quota_rate=share.copy(),
        quota_burst=burst.astype(np.int64),
        audit_rate=audit,
        expected_offload=expected,
        level=level,
        demand=wanted,
        reason=reason,
    )


def jain_index(values: npt.NDArray[Any]) -> float:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``: 1 when all equal, 1/n at worst.

    1.0 for no values or all zeros (nobody is treated worse than another).
    """
    x = np.asarray(values, dtype=np.float64)
    squares = float(np.sum(x * x))
    if x.size == 0 or squares == 0.0:
        return 1.0
    return float(np.sum(x)) ** 2 / (x.size * squares)


def weighted_fairness(share: Floats, weight: Floats, bottlenecked: Bools) -> float:
    """Jain's index of ``share / weight`` over the ``bottlenecked`` devices.

    Under weighted max-min fairness every device whose demand is not met gets
    ``level * weight``, so ``share / weight`` is the same for all of them and
    the index is 1; devices whose demand is met are left out (they asked for
    less than their fair share, which is not unfairness). ``share`` may be
    planned or observed (cloud requests a second actually served);
    ``bottlenecked`` is usually :meth:`FleetPlan.bottlenecked` of the plan in
    force. 1.0 when no device is bottlenecked.
    """
    s = np.asarray(share, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    mask = np.asarray(bottlenecked, dtype=np.bool_)
    return jain_index(s[mask] / w[mask])
