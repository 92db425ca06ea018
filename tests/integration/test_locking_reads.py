"""Read-modify-writes from many sessions at once lose nothing, on both databases.

Sessions at once each read a device's recorded director version under the
lock and record the next one, as an assignment and the hybrid planner do: with
the lock, each reads what the one before committed and no update is lost.
SQLite has no row locks; there the session takes the database's write lock
before the read (:class:`fleet_server.db.engine.SqliteSession`). Audit entries
appended at once each follow the one before, so the chain stays intact.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from fleet_server.assignments.store import lock_recorded_versions
from fleet_server.audit.store import record, verify_chain
from fleet_server.db import Database
from fleet_server.db.engine import migrate
from fleet_server.db.models import Device
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

DEVICE = "pump-1"
WRITERS = 8


async def _next_version(db: Database, started: asyncio.Barrier) -> int:
    async with db.session() as session:
        await started.wait()  # every writer's session open before any reads
        recorded = await lock_recorded_versions(session, [DEVICE])
        await asyncio.sleep(0.01)  # another writer's turn, were the read not held
        device = await session.get(Device, DEVICE)
        assert device is not None
        device.director_version = (recorded[DEVICE] or 0) + 1
        return device.director_version


@pytest.mark.parametrize("kind", DATABASES)
def test_concurrent_read_modify_writes_under_the_lock_lose_no_update(
    kind: str, tmp_path: Path
) -> None:
    async def main() -> tuple[list[int], int]:
        db = Database(url)
        try:
            async with db.session() as session:
                session.add(Device(id=DEVICE, hardware_id="hw", enrolled_at=datetime.now(UTC)))
            started = asyncio.Barrier(WRITERS)
            versions = await asyncio.gather(*(_next_version(db, started) for _ in range(WRITERS)))
            async with db.session() as session:
                final = await session.scalar(
                    select(Device.director_version).where(Device.id == DEVICE)
                )
            return sorted(versions), int(final or 0)
        finally:
            await db.close()

    with database_url(kind, tmp_path) as url:
        migrate(url)
        versions, final = asyncio.run(main())
    assert versions == list(range(1, WRITERS + 1))
    assert final == WRITERS


async def _append(db: Database, started: asyncio.Barrier, n: int) -> None:
    async with db.session() as session:
        await started.wait()
        await record(session, "token:test", "device.update", f"pump-{n}", {"n": n})
        await asyncio.sleep(0.01)  # the transaction still open while the others append


@pytest.mark.parametrize("kind", DATABASES)
def test_audit_entries_appended_at_once_keep_the_chain_intact(kind: str, tmp_path: Path) -> None:
    async def main() -> tuple[bool, int | None, str | None]:
        db = Database(url)
        try:
            started = asyncio.Barrier(WRITERS)
            await asyncio.gather(*(_append(db, started, n) for n in range(WRITERS)))
            async with db.session() as session:
                report = await verify_chain(session)
            return report.ok, report.broken_at, report.problem
        finally:
            await db.close()

    with database_url(kind, tmp_path) as url:
        migrate(url)
        ok, broken_at, problem = asyncio.run(main())
    assert ok, f"broken at entry {broken_at}: {problem}"
