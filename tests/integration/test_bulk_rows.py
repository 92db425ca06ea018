"""Rows written through the driver (``fleet_server.db.bulk``) are the rows SQLAlchemy writes.

Ingest inserts a batch's windows and adds to its hourly rows with statements
compiled once and rows given as tuples; each column's value must reach the
database exactly as SQLAlchemy's own executemany sends it (timestamps,
bytes, JSON), on both databases, and a failing row must fail the way it did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc, insert, text

from fleet_server.db import Database, migrate
from fleet_server.db.bulk import BulkStatement, InsertReturningKeys
from fleet_server.db.models import Device, WindowRow
from fleet_server.rollouts import aggregates as hours
from fleet_server.rollouts.store import _HOURS, _SUMMED_UPSERT, _values_of
from tests.support.databases import DATABASES, database_url

WINDOWS = WindowRow.__table__
COLUMNS = tuple(WINDOWS.c.keys())
HOUR_COLUMNS = tuple(_HOURS.c.keys())
AT = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
ZONES = (UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30)))


@pytest.fixture(params=DATABASES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        migrate(url)
        yield url


def window_values(i: int, device: str) -> dict[str, Any]:
    return {
        "window_id": f"w-{i:05d}",
        "device_id": device,
        "model_name": "pump-health",
        "model_version": "2.0.0",
        "baseline_id": "sha256:" + "ab" * 32,
        "cohort_id": None if i % 2 else "eu",
        "plan_id": None if i % 3 else f"plan-{i}",
        "start": AT + timedelta(seconds=i),
        # A naive time is UTC; the column stores it as UTC either way.
        "end": (AT + timedelta(seconds=i + 30)).replace(tzinfo=None),
        "requests": 2**62 + i,
        "errors": i,
        "payload": bytes(range(256)) * (1 + i % 3) + b"\x00",
        # One instant in several zones, and one time of day: each stored as its UTC time.
        "received_at": AT.astimezone(ZONES[i % len(ZONES)]),
        "ingested_by": None if i % 5 else "replica-1",
    }


def as_rows(values: list[dict[str, Any]], columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    return [tuple(v[c] for c in columns) for v in values]


async def stored(db: Database, table: str, order: str, where: str = "") -> list[tuple[Any, ...]]:
    """The rows as the driver reads them back, no SQLAlchemy type processing."""
    async with db.session() as session:
        result = await session.execute(text(f"SELECT * FROM {table} {where} ORDER BY {order}"))
        return [tuple(r) for r in result.all()]


async def insert_windows_both_ways(url: str) -> None:
    db = Database(url)
    insert_windows = InsertReturningKeys(WINDOWS, COLUMNS, "window_id")
    try:
        async with db.session() as session:
            for d in ("core", "bulk"):
                session.add(Device(id=d, hardware_id="rpi4-arm64", enrolled_at=AT))
        count = 2_500  # more than one SQLite statement's worth of bound values
        core = [window_values(i, "core") for i in range(count)]
        bulk = [window_values(i, "bulk") for i in range(count)]
        for v in bulk:
            v["window_id"] = "b" + v["window_id"]
        async with db.session() as session:
            await session.execute(insert(WINDOWS), core)
        async with db.session() as session:
            keys = await insert_windows.execute(session, as_rows(bulk, COLUMNS))
        assert keys == [v["window_id"] for v in bulk]
        # Stored before (its own and the other device's ids) or new: only the new ones return.
        again = [dict(bulk[0]), dict(core[1]), window_values(count, "bulk")]
        again[2]["window_id"] = "new"
        async with db.session() as session:
            keys = await insert_windows.execute(session, as_rows(again, COLUMNS))
        assert keys == ["new"]
        by_core = await stored(db, "windows", "window_id", "WHERE device_id = 'core'")
        by_bulk = await stored(db, "windows", "window_id", "WHERE device_id = 'bulk'")
        assert len(by_core) == count and len(by_bulk) == count + 1
        key, device = COLUMNS.index("window_id"), COLUMNS.index("device_id")
        for a, b in zip(by_core, by_bulk, strict=False):
            assert b[key] == "b" + a[key]
            assert [v for i, v in enumerate(a) if i not in (key, device)] == [
                v for i, v in enumerate(b) if i not in (key, device)
            ]
    finally:
        await db.close()


def test_windows_inserted_through_the_driver_are_stored_as_sqlalchemy_stores_them(
    url: str,
) -> None:
    asyncio.run(insert_windows_both_ways(url))


async def upsert_hour_rows_both_ways(url: str) -> None:
    db = Database(url)
    try:
        async with db.session() as session:
            for d in ("core", "bulk"):
                session.add(Device(id=d, hardware_id="rpi4-arm64", enrolled_at=AT))
        deltas = [
            hours.AggregateDelta(
                device_id="",
                model_name="pump-health",
                model_version=version,
                hour=hours.hour_of(AT.timestamp()),
                windows=1,
                requests=100 + i,
                fallbacks=i,
                latency_sum=1.5 * i,
                latency_min=0.25 if i else None,
                latency_max=9.5 if i else None,
                latency={i: 3, 40: 1},
                score_classes=("ok", "bad") if i % 2 else None,
                scores={1: 2, 25: i + 1} if i % 2 else {},
                shadow_requests=i,
                shadow_latency={2: 1} if i == 2 else {},
            )
            for i, version in enumerate(("1.0.0", "2.0.0", "2.0.0", "1.0.0"))
        ]
        for postgres, statement in _SUMMED_UPSERT.items():
            if postgres != db.is_postgres:
                continue
            bulk = BulkStatement(statement, HOUR_COLUMNS)
            for d in deltas:  # a row new, then added to
                async with db.session() as session:
                    await session.execute(statement, [_values_of(replace(d, device_id="core"), AT)])
                async with db.session() as session:
                    values = _values_of(replace(d, device_id="bulk"), AT)
                    await bulk.execute(session, as_rows([values], HOUR_COLUMNS))
        order = "model_version, device_id"
        rows = await stored(db, "device_hour_stats", order)
        device = HOUR_COLUMNS.index("device_id")
        by_device: dict[str, list[Any]] = {}
        for r in rows:
            by_device.setdefault(r[device], []).append([v for i, v in enumerate(r) if i != device])
        assert len(by_device["core"]) == 2
        assert by_device["bulk"] == by_device["core"]
        # A row the database refuses fails as it did through SQLAlchemy.
        refused = {**_values_of(replace(deltas[0], device_id="none"), AT), "windows": None}
        with pytest.raises(exc.IntegrityError):
            async with db.session() as session:
                await bulk.execute(session, as_rows([refused], HOUR_COLUMNS))
    finally:
        await db.close()


def test_hour_rows_added_through_the_driver_are_the_rows_sqlalchemy_adds(url: str) -> None:
    asyncio.run(upsert_hour_rows_both_ways(url))
