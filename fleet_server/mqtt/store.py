"""The queries of ingest and of the server's MQTT link (reported state is the registry's)."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    String,
    any_,
    bindparam,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db import Database
from fleet_server.db.dialects import on_postgres
from fleet_server.db.models import Device, Release, WindowRow


def listed(session: AsyncSession, column: Any, ids: Collection[str]) -> ColumnElement[bool]:
    """``column`` is one of ``ids``, the ids bound as one parameter: an array on
    PostgreSQL (``= ANY``), a JSON array on SQLite (``IN (SELECT value FROM json_each(...))``).

    An expanding ``IN`` binds a parameter per id, which costs SQLAlchemy more than the
    query for the hundreds of devices of a batch; one parameter also keeps SQLite's
    limit of bound values out of reach.
    """
    if on_postgres(session):
        listing: Any = any_(bindparam(None, list(ids), type_=ARRAY(String)))
        return column == listing  # type: ignore[no-any-return]
    values: Any = select(literal_column("value")).select_from(
        func.json_each(bindparam(None, json.dumps(list(ids)), type_=String))
    )
    return column.in_(values)  # type: ignore[no-any-return]


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
            .where(listed(session, Device.id, device_ids))
            .order_by(Device.id)
            .with_for_update()
        )
    ).all()


async def window_owners(session: AsyncSession, window_ids: list[str]) -> dict[str, str]:
    """The device each of the stored windows among ``window_ids`` belongs to."""
    rows = await session.execute(
        select(WindowRow.window_id, WindowRow.device_id).where(
            listed(session, WindowRow.window_id, window_ids)
        )
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
