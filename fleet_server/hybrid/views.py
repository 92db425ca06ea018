"""Plans and capacity as the API shows them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fleet_server.db.models import Device
from fleet_server.hybrid.service import Capacity, PlanShown
from protocol.api.plans import (
    CapacityView,
    DeviceHybridView,
    Interval,
    ObservedOffload,
    PlanView,
)
from protocol.hybrid import HybridPlan


def _interval(pair: tuple[float, float] | None) -> Interval | None:
    return None if pair is None else Interval(low=pair[0], high=pair[1])


def _float(inputs: dict[str, Any], key: str) -> float | None:
    value = inputs.get(key)
    return float(value) if isinstance(value, float | int) else None


def _strings(inputs: dict[str, Any], key: str) -> list[str]:
    value = inputs.get(key)
    return [str(v) for v in value] if isinstance(value, list) else []


def plan_view(shown: PlanShown, now: datetime | None = None) -> PlanView:
    """A stored plan, with what its device reported under it."""
    row, seen = shown.row, shown.seen
    inputs = row.inputs if isinstance(row.inputs, dict) else {}
    plan = HybridPlan.model_validate(row.plan)
    return PlanView(
        device_id=row.device_id,
        plan_id=row.plan_id,
        mode=plan.mode,
        tau=plan.tau,
        share=_float(inputs, "share"),
        expected_offload=_float(inputs, "expected_offload"),
        quota_rate=row.quota_rate,
        quota_burst=row.quota_burst,
        issued_at=row.issued_at,
        expires_at=row.expires_at,
        expired=plan.expired(now or datetime.now(UTC)),
        why=str(inputs["why"]) if "why" in inputs else None,
        reasons=_strings(inputs, "reasons"),
        issued_for=_strings(inputs, "issued_for"),
        observed=ObservedOffload(
            requests=seen.requests,
            offloaded=seen.offloaded,
            offload=seen.offload,
            interval=_interval(shown.offload_interval),
            escalated=seen.escalated,
            kept_local_quota=seen.kept_local_quota,
            audits=seen.audits,
            cloud_answered=seen.cloud_answered,
            rate_limited=seen.rate_limited,
            audit_compared=seen.audit_compared,
            audit_agreement=(
                seen.audit_agreements / seen.audit_compared if seen.audit_compared else None
            ),
            audit_agreement_interval=_interval(shown.agreement_interval),
            agreement_promised=(
                seen.audit_confidence_sum / seen.audit_compared if seen.audit_compared else None
            ),
            escalated_agreement=(
                seen.escalated_agreements / seen.escalated_compared
                if seen.escalated_compared
                else None
            ),
        ),
        plan=plan,
        inputs=inputs,
    )


def capacity_view(c: Capacity) -> CapacityView:
    return CapacityView(
        capacity=c.capacity,
        headroom=c.headroom,
        source="operator" if c.source == "operator" else "default",
        updated_at=c.updated_at,
        updated_by=c.updated_by,
    )


def device_hybrid_view(d: Device) -> DeviceHybridView:
    return DeviceHybridView(
        device_id=d.id, weight=d.hybrid_weight, offload_opt_out=d.offload_opt_out
    )
