"""What the agent tells the fleet over MQTT, built from its own state.

Pure functions over data: the install journal, the manifests of the serving
slots, an event record, the serving counters. Each message gets a fresh
``message_id`` and the ``sent_at`` the caller passes, so the link can resend
nothing twice under one id and tests can pin the clock.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from agent.ota.journal import InstallTarget, Journal
from protocol.manifest import Manifest
from protocol.messages import (
    BundleRef,
    DesiredState,
    DeviceEvent,
    Heartbeat,
    HybridPlanState,
    InstallOutcome,
    Presence,
    ReportedState,
    freeform_problem,
)

MAX_DETAILS = 32
MAX_DETAIL_CHARS = 2000
MAX_SHORT_CHARS = 256


def new_message_id() -> str:
    """A unique message id (uuid4, hex)."""
    return uuid.uuid4().hex


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def _ref(target: InstallTarget) -> BundleRef:
    return BundleRef(
        name=target.name,
        version=target.version,
        release_counter=target.release_counter,
        sha256=target.sha256,
    )


def _slot_ref(manifest: Manifest | None, journal: Journal) -> BundleRef | None:
    if manifest is None:
        return None
    # The manifest does not know its bundle's hash; the journal does for the
    # bundle it installed or is trying out.
    sha256 = None
    for target in (journal.target, journal.installed):
        if target and (target.name, target.version) == (manifest.name, manifest.version):
            sha256 = target.sha256
            break
    return BundleRef(
        name=manifest.name,
        version=manifest.version,
        release_counter=manifest.release_counter,
        sha256=sha256,
    )


def reported_state(
    *,
    device_id: str,
    hardware_id: str,
    agent_version: str,
    journal: Journal,
    active: Manifest | None,
    previous: Manifest | None,
    sent_at: float,
    shadow: BundleRef | None = None,
    hybrid_plan: HybridPlanState | None = None,
) -> ReportedState:
    """The device's retained state: what it serves, its shadow, its hybrid plan and how its
    install is going."""
    outcome = journal.last_outcome
    return ReportedState(
        device_id=device_id,
        message_id=new_message_id(),
        sent_at=sent_at,
        agent_version=agent_version,
        hardware_id=hardware_id,
        active=_slot_ref(active, journal),
        previous=_slot_ref(previous, journal),
        installed_counter=journal.installed_counter,
        phase=journal.phase.value,
        installing=_ref(journal.target) if journal.target is not None else None,
        last_outcome=InstallOutcome(
            result=outcome.result,
            bundle=_ref(outcome.target),
            reason=_clip(outcome.reason, MAX_SHORT_CHARS),
            message=_clip(outcome.message, MAX_DETAIL_CHARS),
            at=outcome.at,
        )
        if outcome is not None
        else None,
        shadow=shadow,
        hybrid_plan=hybrid_plan,
    )


def shadow_ref(bundle_id: str, manifest: Manifest) -> BundleRef:
    """The running shadow as messages name it (``bundle_id`` is ``ALGORITHM:HEX``)."""
    algorithm, _, digest = bundle_id.partition(":")
    return BundleRef(
        name=manifest.name,
        version=manifest.version,
        release_counter=manifest.release_counter,
        sha256=digest if algorithm == "sha256" else None,
    )


# Optional parts of the state left out when empty, as servers that predate them expect.
_LEFT_OUT_WHEN_NONE = ("shadow", "hybrid_plan")


def state_payload(state: ReportedState) -> bytes:
    """The state's JSON; without a ``shadow`` key when none runs, nor a ``hybrid_plan`` key
    when the director lists no plan, as servers before them expect."""
    exclude = {key for key in _LEFT_OUT_WHEN_NONE if getattr(state, key) is None}
    return state.model_dump_json(exclude=exclude or None).encode()


def same_state(a: ReportedState, b: ReportedState) -> bool:
    """Whether two reports say the same (ignoring their ids and send times)."""
    ignore = {"message_id", "sent_at"}
    return a.model_dump(exclude=ignore) == b.model_dump(exclude=ignore)


def _detail(value: object) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return _clip(str(value), MAX_DETAIL_CHARS)


def _within_gate(details: dict[str, Any]) -> dict[str, Any]:
    """``details`` with its texts clipped until the server's gate takes them.

    Texts full of multi-byte characters or escapes can exceed the gate's byte
    bound even when each is short enough; halving every text converges fast.
    """
    limit = MAX_DETAIL_CHARS
    while freeform_problem(details) is not None and limit > 8:
        limit //= 2
        details = {
            key: _clip(value, limit) if isinstance(value, str) else value
            for key, value in details.items()
        }
    return details


def device_event(device_id: str, record: Mapping[str, object], sent_at: float) -> DeviceEvent:
    """An install event as the installer recorded it (``{"at", "event", **details}``).

    Details that are ``None`` are left out; long texts are clipped so a message
    stays far below the broker's payload limit.
    """
    at = record.get("at")
    details = {
        _clip(str(key), MAX_SHORT_CHARS) or "?": _detail(value)
        for key, value in record.items()
        if key not in ("at", "event") and value is not None
    }
    return DeviceEvent(
        device_id=device_id,
        message_id=new_message_id(),
        sent_at=sent_at,
        event=_clip(str(record.get("event") or "unknown"), 64) or "unknown",
        at=float(at) if isinstance(at, int | float) and at >= 0 else sent_at,
        details=_within_gate(dict(list(details.items())[:MAX_DETAILS])),
    )


def heartbeat(
    device_id: str, uptime_s: float, served: Mapping[str, int], sent_at: float
) -> Heartbeat:
    """I am alive, and this many requests each stage of the fallback chain answered."""
    return Heartbeat(
        device_id=device_id,
        message_id=new_message_id(),
        sent_at=sent_at,
        uptime_s=max(0.0, uptime_s),
        served=dict(served),
    )


def presence(device_id: str, online: bool, sent_at: float) -> Presence:
    """Online on connect; offline as the last will and on a clean shutdown."""
    return Presence(
        device_id=device_id, message_id=new_message_id(), sent_at=sent_at, online=online
    )


class IgnoredDesiredState(ValueError):
    """A message on the desired topic that is not a desired state for this device."""


def parse_desired(device_id: str, payload: bytes) -> DesiredState:
    """The desired state in ``payload``; raises :class:`IgnoredDesiredState` saying why not."""
    try:
        desired = DesiredState.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise IgnoredDesiredState(f"not a desired state: {where}: {err['msg']}") from None
    if desired.device_id != device_id:
        raise IgnoredDesiredState(f"addressed to device {desired.device_id!r}, not to this one")
    return desired
