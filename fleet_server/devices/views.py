"""The devices feature's answers: ORM rows as the models of :mod:`protocol.api`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleet_server.assignments.models import Refusal
from fleet_server.db.models import Device
from fleet_server.stored_json import show_object, show_value
from protocol.api.devices import DeviceEventView, DeviceRefusal, DeviceView
from protocol.messages import FREEFORM_BOUNDS


def device_view(d: Device) -> DeviceView:
    reported = show_value(d.reported, FREEFORM_BOUNDS, "report") if d.reported else None
    return DeviceView(
        id=d.id,
        hardware_id=d.hardware_id,
        region=d.region,
        timezone=d.timezone,
        tags=list(d.tags or []),
        enrolled_at=d.enrolled_at,
        online=bool(d.online),
        last_seen_at=d.last_seen_at,
        agent_version=d.agent_version,
        active_bundle=d.active_bundle,
        installed_counter=d.installed_counter or 0,
        phase=d.phase,
        assigned_target=d.assigned_target,
        shadow_target=d.shadow_target,
        shadow_rollout=d.shadow_rollout,
        director_version=d.director_version or 0,
        reported=reported.value if reported is not None and reported.omitted is None else None,
        reported_omitted=reported.omitted if reported is not None else None,
        reported_at=d.reported_at,
        decommissioned_at=d.decommissioned_at,
        decommission_reason=d.decommission_reason,
    )


def with_refusals(view: DeviceView, refusals: Sequence[Refusal], warning: str | None) -> DeviceView:
    """``view`` with the device's latest refusals, and a warning if it refused its assignment."""
    return view.model_copy(
        update={
            "refusals": [DeviceRefusal.model_validate(r, from_attributes=True) for r in refusals],
            "assignment_warning": warning,
        }
    )


def event_view(row: Sequence[Any]) -> DeviceEventView:
    """One row of :func:`fleet_server.devices.store.recent_events` as the API shows it."""
    message_id, kind, event, at, received_at, raw = row
    details = show_object(raw, FREEFORM_BOUNDS, "details")
    return DeviceEventView(
        message_id=message_id,
        kind=kind,
        event=event,
        at=at,
        received_at=received_at,
        details=details.value,
        details_omitted=details.omitted,
    )
