"""The ``releases`` table: the queries of the published-releases feature."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.models import Release


async def releases(session: AsyncSession, name: str | None = None) -> list[Release]:
    """Every release (of ``name`` only, if given), by name and release counter."""
    statement = select(Release).order_by(Release.name, Release.release_counter)
    if name is not None:
        statement = statement.where(Release.name == name)
    return list((await session.scalars(statement)).all())


async def known_target_paths(session: AsyncSession) -> set[str]:
    """The target paths the table already records."""
    return {r.target_path for r in (await session.scalars(select(Release))).all()}


async def release_named(session: AsyncSession, release: str) -> Release | None:
    """A release by ``NAME@VERSION`` or by target path, or ``None``."""
    if "@" in release:
        name, _, version = release.rpartition("@")
        return (
            await session.scalars(
                select(Release).where(Release.name == name, Release.version == version).limit(1)
            )
        ).first()
    return await session.get(Release, release)
