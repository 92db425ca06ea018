"""Hourly rows stored by the release before read the same sums once ingest adds to them in SQL.

Before, ingest read a stored hourly row back, summed it with a batch's deltas
and wrote it whole: one pair per cell in its histograms, its hybrid
histograms as JSON written by SQLAlchemy. Now the database adds a batch to a
stored row itself (pairs appended; the hybrid stats' fixed-bin histograms
added bin by bin). A database upgraded from revision ``0015`` with rows of
the old form must read, through every query the rollouts and the hybrid
planner use, the sums of all the windows, old and new: the sums the deltas of
all of them make, folded and combined in Python (SQLite, PostgreSQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import insert

from fleet_server.db import Database, migrate
from fleet_server.db.engine import MIGRATIONS, normalise_url
from fleet_server.db.models import Device, DeviceHourStats, DeviceHybridStats
from fleet_server.hybrid import aggregates as hybrid
from fleet_server.hybrid.store import add_to_hybrid_stats, hybrid_stats, plan_counts
from fleet_server.rollouts import aggregates as hours
from fleet_server.rollouts.store import (
    _values_of,
    add_to_hour_stats,
    device_aggregates,
    received_hour_of,
    shadow_aggregates,
)
from protocol.summary import SCORE_BIN_COUNT, ScoreHistogram
from protocol.window import WindowSummary
from tests.support.databases import DATABASES, database_url
from tests.support.generated_windows import random_window

pytestmark = pytest.mark.integration

DEVICES = ["pump-a", "pump-b", "pump-c", "pump-d"]
VERSIONS = ["2.0.0", "2.1.0"]
RECEIVED = datetime(2026, 12, 7, 10, 30, tzinfo=UTC)
T0 = 1_780_000_000.0
BEFORE = "0015"  # the schema the old rows were written under


@pytest.fixture(params=DATABASES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


def windows(rng: np.random.Generator, count: int) -> list[WindowSummary]:
    out = []
    for _ in range(count):
        start = T0 + float(rng.uniform(0, 2 * 3600))
        w = random_window(rng).model_copy(
            update={
                "device_id": DEVICES[int(rng.integers(0, len(DEVICES)))],
                "model_name": "pump-anomaly",
                "model_version": VERSIONS[int(rng.integers(0, len(VERSIONS)))],
                "start": start,
                "end": start + 60.0,
            }
        )
        if w.scores is not None:  # the layout's bins (other layouts: see the test below)
            counts = rng.poisson(3.0, size=(len(w.scores.classes), SCORE_BIN_COUNT)).tolist()
            w = w.model_copy(
                update={"scores": ScoreHistogram(classes=w.scores.classes, counts=counts)}
            )
        if w.shadow is not None:
            w = w.model_copy(
                update={"shadow": w.shadow.model_copy(update={"model_version": VERSIONS[1]})}
            )
        out.append(w)
    return out


def hour_deltas(ws: list[WindowSummary]) -> list[hours.AggregateDelta]:
    return [*map(hours.fold, ws), *(d for d in map(hours.fold_shadow, ws) if d is not None)]


def upgrade_to(url: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalise_url(url))
    command.upgrade(config, revision)


async def write_old_rows(url: str, old: list[WindowSummary]) -> None:
    """Rows as the release before stored them: each row's sum written whole."""
    db = Database(url)
    try:
        async with db.session() as session:
            for d in DEVICES:
                session.add(Device(id=d, hardware_id="rpi4-arm64", enrolled_at=RECEIVED))
        async with db.session() as session:
            received = received_hour_of(RECEIVED)
            rows = [_values_of(d, received) for d in hours.combine_all(hour_deltas(old)).values()]
            await session.execute(insert(DeviceHourStats.__table__), rows)
            stats = [
                hybrid.row_values(h)
                for h in hybrid.combine_all(map(hybrid.fold_hybrid, old)).values()
            ]
            await session.execute(insert(DeviceHybridStats.__table__), stats)
    finally:
        await db.close()


async def add_batches(url: str, batches: list[list[WindowSummary]]) -> None:
    db = Database(url)
    try:
        for batch in batches:
            async with db.session() as session:
                await add_to_hour_stats(session, hour_deltas(batch), RECEIVED)
                await add_to_hybrid_stats(session, [hybrid.fold_hybrid(w) for w in batch])
    finally:
        await db.close()


async def read_sums(url: str) -> dict[str, Any]:
    since = hours.hour_of(T0)
    until = since + timedelta(hours=4)
    db = Database(url)
    try:
        async with db.session() as session:
            out: dict[str, Any] = {}
            for version in VERSIONS:
                out[f"all {version}"] = await device_aggregates(
                    session, "pump-anomaly", version, since, until
                )
                out[f"listed {version}"] = await device_aggregates(
                    session, "pump-anomaly", version, since, until, DEVICES[:3]
                )
                out[f"shadow {version}"] = await shadow_aggregates(
                    session, "pump-anomaly", version, since, until, DEVICES
                )
            out["hybrid"] = {d.key: d for d in await hybrid_stats(session, since)}
            plans = sorted({key[1] for key in out["hybrid"]})
            out["plan counts"] = {d.key: d for d in await plan_counts(session, plans)}
            return out
    finally:
        await db.close()


def expected_sums(ws: list[WindowSummary]) -> dict[str, Any]:
    """What one row per key, holding the deltas' own sum, reads as."""
    received = received_hour_of(RECEIVED)
    out: dict[str, Any] = {}
    merged = hours.combine_all(hour_deltas(ws))
    for version in VERSIONS:
        rows = [_values_of(d, received) for d in merged.values() if d.model_version == version]
        hour_rows = [tuple(r[f] for f in hours.HourRow._fields) for r in rows]
        out[f"all {version}"] = hours.sum_rows(hour_rows)
        out[f"listed {version}"] = hours.sum_rows([r for r in hour_rows if r[0] in DEVICES[:3]])
        shadow_rows = [tuple(r[f] for f in hours.ShadowRow._fields) for r in rows]
        out[f"shadow {version}"] = hours.sum_shadow_rows(shadow_rows)
    stats = hybrid.combine_all(map(hybrid.fold_hybrid, ws))
    out["hybrid"] = stats
    out["plan counts"] = {
        k: hybrid.HybridDelta(
            **{
                name: getattr(d, name)
                for name in (
                    "device_id",
                    "plan_id",
                    "hour",
                    "last_end",
                    "windows",
                    "requests",
                    "seconds",
                    "local",
                    "escalated",
                    "kept_local_quota",
                    "cloud_answered",
                    "audits",
                    "cloud_errors",
                    "escalated_compared",
                    "escalated_agreements",
                    "audit_compared",
                    "audit_agreements",
                    "audit_confidence_sum",
                )
            }
        )
        for k, d in stats.items()
    }
    return out


def assert_same(read: dict[str, Any], expected: dict[str, Any]) -> None:
    """The same sums: counts exactly, floats up to the order they were added in."""
    assert read.keys() == expected.keys()
    for name in read:
        got, want = read[name], expected[name]
        if isinstance(want, dict):
            assert got.keys() == want.keys(), name
            for key, delta in want.items():
                for field, value in vars(delta).items():
                    if isinstance(value, float):
                        assert getattr(got[key], field) == pytest.approx(value, rel=1e-12)
                    else:
                        assert getattr(got[key], field) == value, (name, key, field)
            continue
        assert type(got) is type(want), name
        for field, value in vars(want).items():
            if field.startswith("_"):
                continue
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                np.testing.assert_allclose(
                    getattr(got, field), value, rtol=1e-12, err_msg=f"{name} {field}"
                )
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(getattr(got, field), value, err_msg=f"{name} {field}")
            else:
                assert getattr(got, field) == value, (name, field)


def test_rows_of_the_release_before_read_the_sums_of_old_and_new_windows(url: str) -> None:
    rng = np.random.default_rng(1414)
    old = windows(rng, 60)
    upgrade_to(url, BEFORE)
    asyncio.run(write_old_rows(url, old))
    migrate(url)
    assert_same(asyncio.run(read_sums(url)), expected_sums(old))

    batches = [windows(rng, int(rng.integers(1, 30))) for _ in range(8)]
    asyncio.run(add_batches(url, batches))
    everything = old + [w for b in batches for w in b]
    read = asyncio.run(read_sums(url))
    assert_same(read, expected_sums(everything))

    # The windows reached every path: rows added to again, shadows, hybrid sections.
    assert max(int(a.windows.max()) for k, a in read.items() if k.startswith("all")) > 3
    assert len(read[f"shadow {VERSIONS[1]}"].device_ids) > 0
    assert any(key[1] for key in read["hybrid"]) and any(not key[1] for key in read["hybrid"])


async def add_scores_of_other_layouts(url: str) -> tuple[list[Any], list[str]]:
    """A stored row of 18 score bins, then a batch of 20 bins added to it, and the other
    way round: what each batch raised, and the rows left."""
    db = Database(url)
    hour = hours.hour_of(T0)
    at = datetime.fromtimestamp(T0, UTC)
    stored = {
        "pump-a": hybrid.HybridDelta("pump-a", "", hour, at, windows=1, scores=(1,) * 18),
        "pump-b": hybrid.HybridDelta("pump-b", "", hour, at, windows=1),
    }
    added = [
        hybrid.HybridDelta("pump-a", "", hour, at, windows=1, scores=(2,) * SCORE_BIN_COUNT),
        hybrid.HybridDelta("pump-b", "", hour, at, windows=1, scores=(2,) * 18),
    ]
    raised: list[str] = []
    try:
        async with db.session() as session:
            for d in DEVICES:
                session.add(Device(id=d, hardware_id="rpi4-arm64", enrolled_at=RECEIVED))
        async with db.session() as session:
            rows = [hybrid.row_values(d) for d in stored.values()]
            await session.execute(insert(DeviceHybridStats.__table__), rows)
        for delta in added:
            try:
                async with db.session() as session:
                    await add_to_hybrid_stats(session, [delta])
            except Exception as exc:  # which error: the database's own, or combine's
                raised.append(type(exc).__name__)
        async with db.session() as session:
            left = await hybrid_stats(session, hour)
        return left, raised
    finally:
        await db.close()


def test_score_histograms_of_another_layout_are_refused_and_leave_the_row(url: str) -> None:
    """A batch whose scores have other bins than its stored row fails, as it did when the
    row was summed in Python (the link then stores the batch's messages one by one and
    drops the one the database will not take, counted as ``unstorable``)."""
    migrate(url)
    left, raised = asyncio.run(add_scores_of_other_layouts(url))
    # pump-a's row has 18 bins and the database sums it: its NULL sum breaks NOT NULL;
    # pump-b's delta has 18 bins against the layout's, and combine refuses it.
    assert raised == ["IntegrityError", "ValueError"], raised
    by_device = {d.device_id: d for d in left}
    assert by_device["pump-a"].scores == (1,) * 18 and by_device["pump-a"].windows == 1
    assert by_device["pump-b"].scores == (0,) * SCORE_BIN_COUNT and by_device["pump-b"].windows == 1
