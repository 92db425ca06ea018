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
   demands nothing and is planned ``local``.
3. Shares by weighted max-min fairness (water-filling): every device gets
   ``min(demand, level * weight)`` with the single ``level`` at which the
   shares sum to the capacity handed out (or every demand is met).
4. tau: the quantile of the device's calibrated confidence that makes its
   expected escalations fit its share, ``share / rate`` of its requests minus
   the audit rate's cost; a device whose share covers all its requests is
   planned ``cloud_first`` only when ``cloud_first_when_covered`` says so,
   otherwise ``escalate`` with tau = 1.
5. Quota: rate = share (never above the device's demand), burst = a few
   seconds of it (at least 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


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


@dataclass(frozen=True)
class FleetDemand:
    """One entry per device, in the same order in every array."""

    device_ids: list[str]
    rate: Floats  # requests a second
    weight: Floats  # > 0
    confidence: npt.NDArray[Any]  # [devices, CONFIDENCE_BINS] counts
    opted_out: Bools
    link_errors: Floats  # share of cloud calls that failed, 0..1
    link_latency_ms: Floats  # cloud latency p95, NaN when unknown


@dataclass(frozen=True)
class FleetPlan:
    """The planner's answer, in the demand's device order."""

    mode: npt.NDArray[np.int8]  # index into protocol.hybrid.PLAN_MODES
    share: Floats  # cloud requests a second granted
    tau: Floats
    quota_rate: Floats
    quota_burst: npt.NDArray[np.int64]
    audit_rate: Floats
    expected_offload: Floats  # expected share of the device's requests sent to the cloud
    level: float  # the water level of the weighted max-min split


def plan_fleet(demand: FleetDemand, settings: PlannerSettings) -> FleetPlan:
    """Plan every device of ``demand`` under ``settings`` (see the module's rules)."""
    raise NotImplementedError("fleet_server.hybrid.planner.plan_fleet is being written")
