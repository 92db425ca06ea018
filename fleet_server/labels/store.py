"""The labels' tables: the windows labelled, and the labels stored for them."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.models import WindowLabels, WindowRow


async def windows(session: AsyncSession, ids: Sequence[str]) -> dict[str, WindowRow]:
    """The stored windows among ``ids``, by id."""
    rows = await session.scalars(select(WindowRow).where(WindowRow.window_id.in_(ids)))
    return {w.window_id: w for w in rows}


async def labels_of(session: AsyncSession, ids: Sequence[str]) -> dict[str, WindowLabels]:
    """The labels stored for the windows among ``ids``, by window id."""
    rows = await session.scalars(select(WindowLabels).where(WindowLabels.window_id.in_(ids)))
    return {row.window_id: row for row in rows}
