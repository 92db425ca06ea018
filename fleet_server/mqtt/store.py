"""The queries of ingest and of the server's MQTT link (reported state is the registry's)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import Row, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db import Database
from fleet_server.db.models import Device, Release, WindowRow


async def lock_devices(
    session: AsyncSession, device_ids: Collection[str]
) -> Sequence[Row[str, datetime | None]]:
    """``(id, decommissioned_at)`` of the devices among ``device_ids``, locked in id order.

    All at once and in id order, so two replicas whose batches share devices
    wait for each other instead of deadlocking.
    """
    return (
        await session.execute(
            select(Device.id, Device.decommissioned_at)
            .where(Device.id.in_(device_ids))
            .order_by(Device.id)
            .with_for_update()
        )
    ).all()


async def window_owners(session: AsyncSession, window_ids: list[str]) -> dict[str, str]:
    """The device each of the stored windows among ``window_ids`` belongs to."""
    rows = await session.execute(
        select(WindowRow.window_id, WindowRow.device_id).where(WindowRow.window_id.in_(window_ids))
    )
    return {window_id: device_id for window_id, device_id in rows.all()}


async def assigned_devices(db: Database) -> list[tuple[Device, Release]]:
    """Every device with an assignment, and the release assigned to it."""
    async with db.session() as session:
        rows = await session.execute(
            select(Device, Release).join(Release, Release.target_path == Device.assigned_target)
        )
        return [(d, r) for d, r in rows.all()]


async def database_answers(db: Database) -> bool:
    """Does the database answer a query now?"""
    try:
        async with db.session() as session:
            await session.execute(text("SELECT 1"))
    except Exception:
        return False
    return True
