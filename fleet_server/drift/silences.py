"""Acknowledging alerts and silencing them, as Alertmanager's silences work.

Rules:

- An operator acknowledges an open alert once (who, when, an optional
  comment); it is not notified again, and is still evaluated and closed when
  its condition clears. A closed alert cannot be acknowledged.
- A silence matches every alert whose kind, scope kind, scope value, model
  and model version equal each matcher it gives (a matcher not given matches
  anything). It is active from its creation until ``ends_at`` and ends on its
  own; expiring it early sets ``ends_at`` to that moment. A silence made from
  an alert takes that alert's kind, scope and model version, so the same
  cause opening again is silenced too while it lasts.
- Silenced alerts are evaluated, opened and closed like any other; only
  their notifications are withheld.
- Every acknowledgement, silence and early expiry is an audit entry.

Matching a silence to an alert, and whether a change is notified, are rules of
:mod:`fleet_server.drift.lifecycle`; this module stores and audits.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server import audit
from fleet_server.db.models import AlertRow, SilenceRow, as_utc
from fleet_server.drift.lifecycle import is_active
from fleet_server.errors import Conflict, FleetError, NotFound
from protocol.api.drift import SilenceRequest


class AlertError(FleetError):
    """An alert or silence request the server refuses; the message says why."""


class AlertNotFound(NotFound, AlertError):
    """No alert or silence goes by that id."""


class AlertConflict(Conflict, AlertError):
    """The alert or silence is past the state the request needs (closed, acknowledged, ended)."""


async def active_silences(session: AsyncSession, now: datetime | None = None) -> list[SilenceRow]:
    """Every silence active at ``now``."""
    now = now or datetime.now(UTC)
    rows = await session.scalars(select(SilenceRow).where(SilenceRow.ends_at > now))
    return [s for s in rows if is_active(s, now)]


async def get_alert(session: AsyncSession, alert_id: int) -> AlertRow:
    row = await session.get(AlertRow, alert_id)
    if row is None:
        raise AlertNotFound(f"no alert {alert_id}")
    return row


async def acknowledge(
    session: AsyncSession, alert_id: int, actor: str, comment: str | None
) -> AlertRow:
    """Acknowledge open alert ``alert_id`` (see the module's rules), in the caller's transaction."""
    row = await get_alert(session, alert_id)
    await session.refresh(row, with_for_update=True)
    if row.state != "open":
        raise AlertConflict(f"alert {alert_id} is closed; only an open alert is acknowledged")
    if row.acknowledged_at is not None:
        raise AlertConflict(
            f"alert {alert_id} was already acknowledged by {row.acknowledged_by} "
            f"at {as_utc(row.acknowledged_at).isoformat(timespec='seconds')}",
        )
    row.acknowledged_at = datetime.now(UTC)
    row.acknowledged_by = actor
    row.acknowledge_comment = comment
    await audit.record(
        session,
        actor,
        "alert.acknowledge",
        str(alert_id),
        {
            "comment": comment,
            "kind": row.kind,
            "scope": row.scope,
            "scope_value": row.scope_value,
            "model": f"{row.model_name}@{row.model_version}",
        },
    )
    return row


async def create_silence(session: AsyncSession, request: SilenceRequest, actor: str) -> SilenceRow:
    """Store the silence ``request`` asks for, from now, in the caller's transaction."""
    now = datetime.now(UTC)
    silence = SilenceRow(
        reason=request.reason,
        created_by=actor,
        created_at=now,
        starts_at=now,
        ends_at=now + timedelta(seconds=request.duration_s),
    )
    if request.alert_id is not None:
        alert = await get_alert(session, request.alert_id)
        silence.alert_id = alert.id
        silence.kind = alert.kind
        silence.scope = alert.scope
        silence.scope_value = alert.scope_value
        silence.model_name = alert.model_name
        silence.model_version = alert.model_version
    else:
        silence.kind = request.kind
        silence.scope = request.scope
        silence.scope_value = request.scope_value
        silence.model_name = request.model
        silence.model_version = request.version
    session.add(silence)
    await session.flush()
    await audit.record(
        session,
        actor,
        "silence.create",
        str(silence.id),
        {
            "alert_id": silence.alert_id,
            "kind": silence.kind,
            "scope": silence.scope,
            "scope_value": silence.scope_value,
            "model": silence.model_name,
            "version": silence.model_version,
            "ends_at": silence.ends_at.isoformat(),
            "reason": silence.reason,
        },
    )
    return silence


async def expire_silence(session: AsyncSession, silence_id: int, actor: str) -> SilenceRow:
    """End silence ``silence_id`` now; refused (409) if it has already ended."""
    silence = await session.get(SilenceRow, silence_id, with_for_update=True)
    if silence is None:
        raise AlertNotFound(f"no silence {silence_id}")
    now = datetime.now(UTC)
    if as_utc(silence.ends_at) <= now:
        raise AlertConflict(
            f"silence {silence_id} already ended at "
            f"{as_utc(silence.ends_at).isoformat(timespec='seconds')}",
        )
    silence.ends_at = now
    silence.expired_by = actor
    await audit.record(
        session, actor, "silence.expire", str(silence_id), {"reason": silence.reason}
    )
    return silence


async def list_silences(
    session: AsyncSession, state: str, limit: int, now: datetime | None = None
) -> list[SilenceRow]:
    """Silences newest first: ``active``, ``expired`` (ended) or ``all``."""
    now = now or datetime.now(UTC)
    statement = select(SilenceRow).order_by(SilenceRow.id.desc()).limit(limit)
    if state == "active":
        statement = statement.where(SilenceRow.ends_at > now)
    elif state == "expired":
        statement = statement.where(SilenceRow.ends_at <= now)
    return list((await session.scalars(statement)).all())
