"""Every timestamp column stores UTC and reads back timezone-aware UTC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from fleet_server.db.engine import Database, migrate
from fleet_server.db.models import Device
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

PLUS_TWO = timezone(timedelta(hours=2))
ENROLLED = datetime(2026, 3, 1, 14, 30, 15, 123456, tzinfo=PLUS_TWO)  # 12:30:15 UTC
SEEN = datetime(2026, 3, 1, 13, 0)  # naive: taken to be UTC


@pytest.mark.parametrize("kind", DATABASES)
def test_timestamps_read_back_as_aware_utc_instants(kind: str, tmp_path: Path) -> None:
    async def run(url: str) -> None:
        db = Database(url)
        try:
            async with db.session() as session:
                session.add(Device(id="pump-1", hardware_id="rpi4", enrolled_at=ENROLLED))
                session.add(
                    Device(
                        id="pump-2",
                        hardware_id="rpi4",
                        enrolled_at=ENROLLED + timedelta(hours=1),
                        last_seen_at=SEEN,
                    )
                )
            async with db.session() as session:
                rows = list(await session.scalars(select(Device).order_by(Device.id)))
                columns = (await session.execute(select(Device.enrolled_at))).scalars().all()
                # A bound in another zone compares as the instant it is, not its wall time.
                later = await session.scalars(
                    select(Device.id).where(
                        Device.enrolled_at
                        > datetime(2026, 3, 1, 20, 0, tzinfo=timezone(timedelta(hours=7)))
                    )
                )
                assert list(later) == ["pump-2"]
        finally:
            await db.close()
        assert [r.enrolled_at for r in rows] == [
            datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC),
            datetime(2026, 3, 1, 13, 30, 15, 123456, tzinfo=UTC),
        ]
        assert rows[1].last_seen_at == datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
        assert rows[0].last_seen_at is None
        for at in [*columns, rows[0].enrolled_at, rows[1].last_seen_at]:
            assert at is not None and at.utcoffset() == timedelta(0), at

    with database_url(kind, tmp_path) as url:
        migrate(url)
        asyncio.run(run(url))
