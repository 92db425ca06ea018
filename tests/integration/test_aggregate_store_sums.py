"""The hourly stores add a batch to a stored row as the deltas' own sum does (SQLite, PostgreSQL).

:func:`fleet_server.rollouts.store.add_to_hour_stats` and
:func:`fleet_server.hybrid.store.add_to_hybrid_stats` sum a stored row with a
batch's deltas without making the row a delta, and the hybrid store leaves a
JSON column the batch adds nothing to as it is stored. These tests hold the
rows they leave, batch after batch of generated windows, to the rows the
deltas' own sums make (:func:`~fleet_server.rollouts.aggregates.combine` of
the stored row's delta and the batch's, then its column values): the same
values, column by column, floats summed in the same order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from fleet_server.db import Database, migrate
from fleet_server.db.models import Device, DeviceHourStats, DeviceHybridStats
from fleet_server.hybrid import aggregates as hybrid
from fleet_server.hybrid.store import add_to_hybrid_stats
from fleet_server.rollouts import aggregates as hours
from fleet_server.rollouts.store import _values_of, add_to_hour_stats, received_hour_of
from protocol.summary import SCORE_BIN_COUNT, ScoreHistogram
from protocol.window import WindowSummary
from tests.support.databases import DATABASES, database_url
from tests.support.generated_windows import random_window

pytestmark = pytest.mark.integration

DEVICES = ["pump-a", "pump-b", "pump-c"]
# The hourly rows' histograms: packed pairs, more than one per cell once added to.
HISTOGRAMS = ("latency", "scores", "shadow_latency")
RECEIVED = datetime(2026, 12, 7, 10, 30, tzinfo=UTC)
T0 = 1_780_000_000.0


@pytest.fixture(params=DATABASES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        migrate(url)
        yield url


def windows(rng: np.random.Generator, count: int) -> list[WindowSummary]:
    """Generated windows of a few devices, versions, plans and hours, so rows are added to
    again and again; scores over the layout's bins, now and then over other classes."""
    out = []
    for _ in range(count):
        w = random_window(rng)
        update: dict[str, Any] = {
            "device_id": DEVICES[int(rng.integers(0, len(DEVICES)))],
            "model_version": ["2.0.0", "2.1.0"][int(rng.integers(0, 2))],
            "start": T0 + float(rng.uniform(0, 3 * 3600)),
        }
        update["end"] = update["start"] + 60.0
        if w.scores is not None:
            classes = ["ok", "worn"] if rng.random() < 0.15 else list(w.scores.classes)
            counts = rng.poisson(3.0, size=(len(classes), SCORE_BIN_COUNT)).tolist()
            update["scores"] = ScoreHistogram(classes=classes, counts=counts)
        out.append(w.model_copy(update=update))
    return out


def summed(
    batches: list[list[WindowSummary]],
) -> tuple[dict[Any, dict[str, Any]], dict[Any, dict[str, Any]], int]:
    """The rows of both stores as the deltas' own sums make them, batch after batch, and
    how often a stored row's scores met a batch's over other classes."""
    hour_rows: dict[hours.Key, hours.AggregateDelta] = {}
    hybrid_rows: dict[hybrid.Key, hybrid.HybridDelta] = {}
    other_classes = 0
    for batch in batches:
        shadows = [d for d in map(hours.fold_shadow, batch) if d is not None]
        for key, d in hours.combine_all([*map(hours.fold, batch), *shadows]).items():
            before = hour_rows.get(key)
            if before is not None and None not in (before.score_classes, d.score_classes):
                other_classes += before.score_classes != d.score_classes
            hour_rows[key] = d if before is None else hours.combine(before, d)
        for key, h in hybrid.combine_all(map(hybrid.fold_hybrid, batch)).items():
            hybrid_rows[key] = h if key not in hybrid_rows else hybrid.combine(hybrid_rows[key], h)
    received = received_hour_of(RECEIVED)
    return (
        {k: _values_of(d, received) for k, d in hour_rows.items()},
        {k: hybrid.row_values(h) for k, h in hybrid_rows.items()},
        other_classes,
    )


async def store(url: str, batches: list[list[WindowSummary]]) -> tuple[list[Any], list[Any]]:
    db = Database(url)
    try:
        async with db.session() as session:
            for d in DEVICES:
                session.add(Device(id=d, hardware_id="rpi4-arm64", enrolled_at=RECEIVED))
        for batch in batches:
            async with db.session() as session:
                shadows = [d for d in map(hours.fold_shadow, batch) if d is not None]
                await add_to_hour_stats(session, [*map(hours.fold, batch), *shadows], RECEIVED)
                await add_to_hybrid_stats(session, [hybrid.fold_hybrid(w) for w in batch])
        async with db.session() as session:
            hour_rows = (await session.execute(select(*DeviceHourStats.__table__.columns))).all()
            hybrid_rows = (
                await session.execute(select(*DeviceHybridStats.__table__.columns))
            ).all()
        return list(hour_rows), list(hybrid_rows)
    finally:
        await db.close()


def test_rows_summed_batch_after_batch_are_those_of_the_deltas_sums(url: str) -> None:
    rng = np.random.default_rng(14)
    batches = [windows(rng, int(rng.integers(1, 40))) for _ in range(12)]
    expected_hours, expected_hybrid, other_classes = summed(batches)
    hour_rows, hybrid_rows = asyncio.run(store(url, batches))

    assert len(hour_rows) == len(expected_hours)
    for row in hour_rows:
        key = (row.device_id, row.model_name, row.model_version, row.hour)
        stored, expected = dict(row._mapping), dict(expected_hours[key])
        for name in HISTOGRAMS:
            assert (stored[name] is None) == (expected[name] is None), (key, name)
            assert isinstance(stored[name], bytes | None), (key, name)
            assert len(stored[name] or b"") % hours.PAIR.itemsize == 0, (key, name)
            cells = hours.decode_counts(stored.pop(name) or b"")
            assert cells == hours.decode_counts(expected.pop(name) or b""), (key, name)
        assert stored == expected, key
    assert len(hybrid_rows) == len(expected_hybrid)
    for row in hybrid_rows:
        key = (row.device_id, row.plan_id, row.hour)
        assert dict(row._mapping) == expected_hybrid[key], key

    # The batches reached every path: rows added to again, over other classes, with and
    # without shadows and hybrid sections.
    assert max(r.windows for r in hour_rows) > 3
    assert any(r.shadow_requests for r in hour_rows)
    assert any(r.plan_id for r in hybrid_rows) and any(not r.plan_id for r in hybrid_rows)
    assert other_classes > 3
