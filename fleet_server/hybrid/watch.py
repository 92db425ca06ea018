"""When the fleet's plans must be made again: pure checks of what devices report against
what their plans expected.

A plan is watched, not trusted (deferral thresholds break under distribution
shift): the server re-plans when

- a device's observed offload (the share of its requests its plan's tau and audit
  rate sent, or would have sent but for the quota: ``escalated + kept_local_quota +
  audits`` over its requests) lies outside the Wilson score interval of its counts
  around the plan's expected offload: a binomial interval, not a point;
- the endpoint's load (the summed rate of cloud answers and 429s under the current
  plans) exceeds the capacity C;
- the agreement of audited requests with the cloud (``audit_agreements /
  audit_compared``) is outside the interval of what calibration promised
  (``audit_confidence_sum / audit_compared``, the mean calibrated confidence);
- drift is flagged for the device (an open alert it was not planned with);
- the capacity, or a device's weight, opt-out or calibration temperature, changed;
- devices joined (no plan) or left (a plan of a decommissioned device);
- a plan nears its expiry.

Each check returns the reason as a sentence (recorded in the plan's inputs and the
audit log) or ``None``. The interval is :func:`fleet_server.hybrid.checks.wilson_interval`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from fleet_server.hybrid.aggregates import HybridDelta
from fleet_server.hybrid.checks import wilson_interval

# Fewer requests (or compared audits) than this say too little to re-plan on.
MIN_REQUESTS = 30
MIN_COMPARED = 20


def wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of ``k`` of ``n`` at two-sided ``confidence`` ((0, 1): none)."""
    low, high = wilson_interval(k, n, confidence)
    return (float(low), float(high))


@dataclass(frozen=True)
class Observed:
    """What a device reported under its current plan (and the renewals of the same plan)."""

    requests: int = 0
    offloaded: int = 0  # escalated + kept_local_quota + audits
    escalated: int = 0
    kept_local_quota: int = 0
    audits: int = 0
    cloud_answered: int = 0
    rate_limited: int = 0
    seconds: float = 0.0
    audit_compared: int = 0
    audit_agreements: int = 0
    audit_confidence_sum: float = 0.0
    escalated_compared: int = 0
    escalated_agreements: int = 0

    @property
    def offload(self) -> float | None:
        return self.offloaded / self.requests if self.requests else None

    @property
    def cloud_rate(self) -> float:
        """Requests a second the device brought to the endpoint (answered or refused 429)."""
        return (self.cloud_answered + self.rate_limited) / self.seconds if self.seconds else 0.0


def observed(rows: Sequence[HybridDelta]) -> Observed:
    """The sum of a plan's rows."""
    return Observed(
        requests=sum(r.requests for r in rows),
        offloaded=sum(r.escalated + r.kept_local_quota + r.audits for r in rows),
        escalated=sum(r.escalated for r in rows),
        kept_local_quota=sum(r.kept_local_quota for r in rows),
        audits=sum(r.audits for r in rows),
        cloud_answered=sum(r.cloud_answered for r in rows),
        rate_limited=sum(r.cloud_errors.get("rate_limited", 0) for r in rows),
        seconds=sum(r.seconds for r in rows),
        audit_compared=sum(r.audit_compared for r in rows),
        audit_agreements=sum(r.audit_agreements for r in rows),
        audit_confidence_sum=sum(r.audit_confidence_sum for r in rows),
        escalated_compared=sum(r.escalated_compared for r in rows),
        escalated_agreements=sum(r.escalated_agreements for r in rows),
    )


def offload_reason(expected: float, seen: Observed, confidence: float) -> str | None:
    """Why the observed offload contradicts the ``expected`` one, or ``None``."""
    if seen.requests < MIN_REQUESTS:
        return None
    lo, hi = wilson(seen.offloaded, seen.requests, confidence)
    if lo <= expected <= hi:
        return None
    return (
        f"observed offload {seen.offloaded / seen.requests:.3f} "
        f"(interval {lo:.3f}-{hi:.3f} over {seen.requests} requests) "
        f"does not hold the expected {expected:.3f}"
    )


def agreement_reason(seen: Observed, confidence: float) -> str | None:
    """Why audited agreement contradicts what calibration promised, or ``None``."""
    if seen.audit_compared < MIN_COMPARED:
        return None
    promised = min(seen.audit_confidence_sum / seen.audit_compared, 1.0)
    lo, hi = wilson(seen.audit_agreements, seen.audit_compared, confidence)
    if lo <= promised <= hi:
        return None
    return (
        f"audit agreement {seen.audit_agreements / seen.audit_compared:.3f} "
        f"(interval {lo:.3f}-{hi:.3f} over {seen.audit_compared} audits) "
        f"does not hold the {promised:.3f} calibration promised"
    )


def load_reason(load: float, capacity: float) -> str | None:
    """Why the endpoint's load under the current plans calls for a re-plan, or ``None``."""
    if load <= capacity:
        return None
    return f"endpoint load {load:.2f}/s exceeds the capacity {capacity:.2f}/s"


def expiry_reason(expires_at: datetime, now: datetime, renew_before: timedelta) -> str | None:
    """Why a plan is renewed now (it expires within ``renew_before``), or ``None``."""
    if expires_at - now > renew_before:
        return None
    return f"plan expires at {expires_at:%Y-%m-%d %H:%M:%S}Z"


def changed_reason(what: str, before: object, now: object) -> str | None:
    """``"<what> changed from X to Y"`` when they differ (floats compared to 1e-9), or ``None``."""
    if isinstance(before, float | int) and isinstance(now, float | int):
        if math.isclose(float(before), float(now), rel_tol=1e-9, abs_tol=1e-12):
            return None
    elif before == now:
        return None
    return f"{what} changed from {before} to {now}"
