"""The assignments feature's store: the SQL behind assignments, rules and refusals.

Every function works in the caller's session (and so its transaction); none
signs or announces anything.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.assignments.models import Refusal
from fleet_server.db.models import Assignment, AssignmentRule, Device, DeviceEventRow, Release

# The agent's events that say it refused an update, or rolled it back and will not
# retry it, or was sent back from it by a fleet rollback (see agent.ota.installer),
# or refused (or dropped) the hybrid plan its director signed (see agent.ota.plan).
REFUSAL_EVENTS = (
    "check-refused",
    "assignment-refused",
    "refused",
    "rolled-back",
    "fleet-rolled-back",
    "plan-refused",
)


async def releases_by_path(
    session: AsyncSession, target_paths: Collection[str] | None = None
) -> dict[str, Release]:
    """Releases by target path: those named, or (``None``) all."""
    query = select(Release)
    if target_paths is not None:
        query = query.where(Release.target_path.in_(list(target_paths)))
    return {r.target_path: r for r in (await session.scalars(query)).all()}


async def current_assignment(session: AsyncSession, device_id: str) -> Assignment | None:
    """The device's latest assignment (cancelled or not), or ``None``."""
    return (
        await session.scalars(
            select(Assignment)
            .where(Assignment.device_id == device_id)
            .order_by(Assignment.id.desc())
            .limit(1)
        )
    ).first()


async def current_assignments(session: AsyncSession) -> list[Assignment]:
    """Every device's latest assignment (cancelled or not), by device id."""
    latest = (
        select(Assignment.device_id, func.max(Assignment.id).label("id"))
        .group_by(Assignment.device_id)
        .subquery()
    )
    return list(
        (
            await session.scalars(
                select(Assignment)
                .join(latest, Assignment.id == latest.c.id)
                .order_by(Assignment.device_id)
            )
        ).all()
    )


async def rules(
    session: AsyncSession, *, tags: Collection[str] | None = None, cancelled: bool = False
) -> list[AssignmentRule]:
    """Tag rules by id: of ``tags`` (default every tag), the cancelled ones only if asked."""
    query = select(AssignmentRule).order_by(AssignmentRule.id)
    if tags is not None:
        query = query.where(AssignmentRule.tag.in_(sorted(tags)))
    if not cancelled:
        query = query.where(AssignmentRule.cancelled_at.is_(None))
    return list((await session.scalars(query)).all())


async def lock_rules_of(session: AsyncSession, target_path: str) -> list[AssignmentRule]:
    """The active tag rules that assign ``target_path``, locked."""
    return list(
        (
            await session.scalars(
                select(AssignmentRule)
                .where(
                    AssignmentRule.target_path == target_path,
                    AssignmentRule.cancelled_at.is_(None),
                )
                .with_for_update()
            )
        ).all()
    )


async def lock_devices(session: AsyncSession, device_ids: Sequence[str]) -> list[Device]:
    """The devices named, locked in id order (two writers of one device never deadlock)."""
    locked = await session.execute(
        select(Device).where(Device.id.in_(list(device_ids))).order_by(Device.id).with_for_update()
    )
    return list(locked.scalars())


async def lock_assigned(session: AsyncSession, target_path: str) -> list[Device]:
    """The devices assigned ``target_path``, locked in id order."""
    return list(
        (
            await session.scalars(
                select(Device)
                .where(Device.assigned_target == target_path)
                .order_by(Device.id)
                .with_for_update()
            )
        ).all()
    )


async def devices_by_id(session: AsyncSession, device_ids: Sequence[str]) -> list[Device]:
    """The devices named (those that exist), in id order, unlocked."""
    return list(
        (
            await session.scalars(
                select(Device).where(Device.id.in_(list(device_ids))).order_by(Device.id)
            )
        ).all()
    )


async def lock_shadowing(session: AsyncSession, target_path: str) -> list[Device]:
    """The devices holding ``target_path`` as a shadow install, locked in id order."""
    return list(
        (
            await session.scalars(
                select(Device)
                .where(Device.shadow_target == target_path)
                .order_by(Device.id)
                .with_for_update()
            )
        ).all()
    )


async def lock_recorded_versions(
    session: AsyncSession, device_ids: Sequence[str]
) -> dict[str, int | None]:
    """Each device's recorded director version, its row locked (read again under the lock)."""
    locked = await session.execute(
        select(Device.id, Device.director_version)
        .where(Device.id.in_(list(device_ids)))
        .order_by(Device.id)
        .with_for_update()
    )
    return {device_id: version for device_id, version in locked}


async def committed_rows(
    session: AsyncSession, device_ids: Sequence[str] | None, *, lock: bool = False
) -> list[Any]:
    """``(id, hardware_id, assigned_target, director_version, assigned_rollback_of,
    shadow_target)`` of the devices assigned something now or once (a withdrawn assignment
    must come to name nothing), or of ``device_ids`` only; ``lock``: locked in id order,
    whatever they were assigned."""
    query = select(
        Device.id,
        Device.hardware_id,
        Device.assigned_target,
        Device.director_version,
        Device.assigned_rollback_of,
        Device.shadow_target,
    )
    if device_ids is not None:
        query = query.where(Device.id.in_(list(device_ids)))
    if lock:
        query = query.order_by(Device.id).with_for_update()
    else:
        query = query.where(or_(Device.assigned_target.is_not(None), Device.director_version > 0))
    return list((await session.execute(query)).all())


async def record_version(
    session: AsyncSession, device_id: str, target_path: str | None, version: int
) -> None:
    """Record the device's director version, only if no newer assignment was committed."""
    same_target = (
        Device.assigned_target.is_(None)
        if target_path is None
        else Device.assigned_target == target_path
    )
    await session.execute(
        update(Device)
        .where(Device.id == device_id, same_target, Device.director_version < version)
        .values(director_version=version)
    )


async def set_version(session: AsyncSession, device_id: str, version: int) -> None:
    """Record the device's director version (its row is locked by the caller)."""
    await session.execute(
        update(Device).where(Device.id == device_id).values(director_version=version)
    )


def _text(details: dict[str, Any], key: str) -> str | None:
    value = details.get(key)
    return value[:500] if isinstance(value, str) else None


async def recent_refusals(session: AsyncSession, device_id: str, limit: int = 5) -> list[Refusal]:
    """The device's latest refusal events, newest first."""
    rows = await session.scalars(
        select(DeviceEventRow)
        .where(DeviceEventRow.device_id == device_id, DeviceEventRow.event.in_(REFUSAL_EVENTS))
        .order_by(DeviceEventRow.id.desc())
        .limit(limit)
    )
    refusals = []
    for row in rows:
        details = row.details if isinstance(row.details, dict) else {}
        refusals.append(
            Refusal(
                at=row.at,
                received_at=row.received_at,
                event=row.event,
                reason=_text(details, "reason"),
                # A refused install names its bundle; a given-up download the one abandoned.
                bundle=_text(details, "bundle") or _text(details, "abandoned"),
                message=_text(details, "message"),
            )
        )
    return refusals


def cancel(row: Assignment | AssignmentRule, at: datetime, actor: str) -> None:
    """Mark an assignment or a rule cancelled by ``actor``."""
    row.cancelled_at, row.cancelled_by = at, actor
