"""Hybrid plans: each device's plan and why, the cloud's capacity, a device's weight and opt-out."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from protocol.api.base import DeviceId, RequestBody, ResponseBody
from protocol.hybrid import HybridPlan, PlanMode


class PlanQuery(RequestBody):
    """Which plans to list."""

    device_id: DeviceId | None = Field(default=None, description="only this device's plan")


class Interval(ResponseBody):
    """A Wilson score interval of a share."""

    low: float
    high: float


class ObservedOffload(ResponseBody):
    """What the device reported under its plan (and the renewals of the same plan)."""

    requests: int = Field(description="requests its windows under the plan counted")
    offloaded: int = Field(
        description="of them, sent to the cloud or held back only by the quota "
        "(escalated + kept_local_quota + audits)"
    )
    offload: float | None = Field(default=None, description="offloaded / requests")
    interval: Interval | None = Field(
        default=None, description="the binomial (Wilson) interval of offload"
    )
    escalated: int = 0
    kept_local_quota: int = 0
    audits: int = 0
    cloud_answered: int = 0
    rate_limited: int = 0
    audit_compared: int = 0
    audit_agreement: float | None = Field(
        default=None, description="audited requests whose local and cloud answers agreed"
    )
    audit_agreement_interval: Interval | None = None
    agreement_promised: float | None = Field(
        default=None,
        description="the mean calibrated confidence of the compared audits: the agreement "
        "calibration promises",
    )
    escalated_agreement: float | None = Field(
        default=None, description="escalated requests whose local and cloud answers agreed"
    )


class PlanView(ResponseBody):
    """A device's current plan: what was signed, what it was planned from, how it is followed."""

    device_id: str
    plan_id: str
    mode: PlanMode
    tau: float
    share: float | None = Field(
        default=None, description="cloud requests a second granted by the weighted max-min split"
    )
    expected_offload: float | None = Field(
        default=None, description="the share of its requests the plan expects it to send"
    )
    quota_rate: float
    quota_burst: int
    issued_at: datetime
    expires_at: datetime
    expired: bool
    why: str | None = Field(default=None, description="why the device got its mode")
    reasons: list[str] = Field(
        default_factory=list, description="why the fleet was last planned again"
    )
    issued_for: list[str] = Field(
        default_factory=list, description="why this plan was issued (re-planned)"
    )
    observed: ObservedOffload
    plan: HybridPlan = Field(description="the plan as signed into the device's director metadata")
    inputs: dict[str, Any] = Field(description="everything the planner planned it from")


class PlanList(ResponseBody):
    plans: list[PlanView]


class CapacityView(ResponseBody):
    """The cloud endpoint's capacity C and the share of it held back."""

    capacity: float = Field(description="requests a second the cloud endpoint serves")
    headroom: float = Field(description="share of the capacity the planner does not hand out")
    source: Literal["operator", "default"]
    updated_at: datetime | None = None
    updated_by: str | None = None


class SetCapacity(RequestBody):
    """A new capacity; the fleet is planned again at once."""

    capacity: float = Field(ge=0, le=1e9, description="requests a second")
    headroom: float = Field(default=0.1, ge=0, lt=1)


class DeviceHybridChange(RequestBody):
    """A device's weight (priority in the split of the capacity) and opt-out."""

    weight: float | None = Field(default=None, gt=0, le=1e6)
    offload_opt_out: bool | None = Field(
        default=None, description="true: its data must not leave it, it is planned local only"
    )


class DeviceHybridView(ResponseBody):
    device_id: str
    weight: float
    offload_opt_out: bool
