"""The rollouts' store on real databases (SQLite and PostgreSQL): hourly aggregates kept by
ingest's own batch writer, counting each window once however often it is delivered; rollouts
saved optimistically; devices reached and evaluations recorded once; the migration down and up.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from fleet_server.db import Database, migrate
from fleet_server.db.engine import MIGRATIONS, normalise_url
from fleet_server.db.models import Device, DeviceHourStats, RolloutEvaluation
from fleet_server.labels.service import post_labels
from fleet_server.mqtt.ingest import Accepted, classify, write_batch
from fleet_server.rollouts import store
from fleet_server.rollouts.aggregates import fold
from fleet_server.rollouts.kept import KeptAggregates, Range
from fleet_server.rollouts.verdicts import GateEvaluation
from protocol.api.labels import WindowLabelsBody
from protocol.histogram import ExponentialHistogram, record
from protocol.summary import score_histogram
from protocol.topics import windows_topic
from protocol.window import WindowSummary, encode_window
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

NS = "rollout-store"
HOUR = 3600.0
T0 = 1_780_000_800.0  # 2026-05-28 20:40 UTC
CLASSES = ["ok", "fault"]
T = TypeVar("T")


@pytest.fixture(params=DATABASES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        migrate(url)
        yield url


def run(url: str, body: Callable[[Database], Awaitable[T]]) -> T:
    async def main() -> T:
        db = Database(url)
        try:
            return await body(db)
        finally:
            await db.close()

    return asyncio.run(main())


def window(
    device: str, end: float, *, version: str = "2.0.0", requests: int = 60, fallbacks: int = 3
) -> WindowSummary:
    rng = np.random.default_rng(int(end) % 1000 + len(device))
    return WindowSummary(
        window_id=uuid.uuid4().hex,
        device_id=device,
        model_name="vibration",
        model_version=version,
        baseline_id="b1",
        start=end - 60,
        end=end,
        requests=requests,
        errors=1,
        served={"active": requests - fallbacks, "previous": fallbacks},
        features=[],
        scores=score_histogram(rng.dirichlet([1.0, 1.0], size=requests), CLASSES),
        latency_ms=record(ExponentialHistogram(), rng.lognormal(3.5, 0.3, size=requests)),
    )


def accepted(w: WindowSummary) -> Accepted:
    verdict = classify(windows_topic(NS, w.device_id), encode_window(w), 65536, namespace=NS)
    assert isinstance(verdict, Accepted), verdict
    return verdict


async def register(db: Database, *devices: str) -> None:
    async with db.session() as session:
        for d in devices:
            session.add(Device(id=d, hardware_id="rpi4-arm64", enrolled_at=datetime.now(UTC)))


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_each_window_counts_once_in_its_hour_however_often_it_is_delivered(url: str) -> None:
    first = [window("a", T0), window("a", T0 + 60), window("b", T0 + HOUR)]
    later = [window("a", T0 + 120)]

    async def body(db: Database) -> tuple[list[DeviceHourStats], store.DeviceAggregates]:
        await register(db, "a", "b")
        await write_batch(db, [accepted(w) for w in first], "r1")
        # Redelivered (QoS 1, a replica restart), alone and beside a new window.
        await write_batch(db, [accepted(w) for w in first], "r2")
        await write_batch(db, [accepted(w) for w in first[:1] + later + first[1:]], "r1")
        async with db.session() as session:
            rows = list(
                (
                    await session.scalars(
                        select(DeviceHourStats).order_by(
                            DeviceHourStats.device_id, DeviceHourStats.hour
                        )
                    )
                ).all()
            )
            aggregates = await store.device_aggregates(
                session, "vibration", "2.0.0", at(T0 - HOUR), at(T0 + 2 * HOUR)
            )
        return rows, aggregates

    rows, aggregates = run(url, body)
    assert [(r.device_id, r.hour, r.windows) for r in rows] == [
        ("a", at(T0 - 40 * 60), 3),
        ("b", at(T0 + HOUR - 40 * 60), 1),
    ]
    a = rows[0]
    assert (a.requests, a.fallbacks, a.errors) == (180, 9, 3)
    assert aggregates.device_ids == ["a", "b"]
    assert aggregates.windows.tolist() == [3, 1]
    assert aggregates.requests.tolist() == [180, 60]
    assert aggregates.latency.sum(axis=1).tolist() == [180, 60]
    expected = sum(np.asarray(w.scores.counts) for w in first[:2] + later if w.scores)
    assert (aggregates.scores[0] == expected).all()
    assert aggregates.classes == tuple(CLASSES)


def test_a_window_whose_id_another_device_holds_is_not_counted_for_it(url: str) -> None:
    mine = window("a", T0)
    theirs = mine.model_copy(update={"device_id": "b"})

    async def body(db: Database) -> list[tuple[str, int]]:
        await register(db, "a", "b")
        await write_batch(db, [accepted(mine)], "r1")
        result = await write_batch(db, [accepted(theirs)], "r1")
        assert result.dropped == {"window-id-taken": 1}
        async with db.session() as session:
            rows = await session.execute(
                select(DeviceHourStats.device_id, DeviceHourStats.windows).order_by(
                    DeviceHourStats.device_id
                )
            )
            return [(d, n) for d, n in rows.all()]

    assert run(url, body) == [("a", 1)]


def test_a_tick_reads_the_devices_version_and_hours_it_asks_for(url: str) -> None:
    windows = [
        window("a", T0 - 30 * HOUR),  # before the range
        window("a", T0 - 20 * HOUR, fallbacks=10),
        window("a", T0 - 2 * HOUR, fallbacks=0),
        window("b", T0 - 5 * HOUR),
        window("c", T0 - 5 * HOUR),  # not asked for
        window("a", T0, version="3.0.0"),  # another version
        window("b", T0 + HOUR),  # the hour ``until`` starts: outside
    ]

    async def body(db: Database) -> store.DeviceAggregates:
        await register(db, "a", "b", "c")
        await write_batch(db, [accepted(w) for w in windows], "r1")
        async with db.session() as session:
            return await store.device_aggregates(
                session,
                "vibration",
                "2.0.0",
                at(T0 - 24 * HOUR),
                datetime(2026, 5, 28, 21, tzinfo=UTC),
                devices=["a", "b", "nobody"],
            )

    aggregates = run(url, body)
    assert aggregates.device_ids == ["a", "b"]
    assert aggregates.windows.tolist() == [2, 1]
    assert aggregates.fallbacks.tolist() == [10, 3]
    assert aggregates.requests.tolist() == [120, 60]


def test_labels_add_to_the_hour_of_the_window_they_label(url: str) -> None:
    async def body(db: Database) -> store.DeviceAggregates:
        await register(db, "a")
        await write_batch(db, [accepted(window("a", T0))], "r1")
        async with db.session() as session:
            await store.add_labels(session, "a", "vibration", "2.0.0", at(T0), 40, 36)
            await store.add_labels(session, "a", "vibration", "2.0.0", at(T0), -40, -36)
            await store.add_labels(session, "a", "vibration", "2.0.0", at(T0), 50, 44)
            # Labels for an hour with no window yet make its row.
            await store.add_labels(session, "a", "vibration", "2.0.0", at(T0 + HOUR), 5, 5)
        async with db.session() as session:
            return await store.device_aggregates(
                session, "vibration", "2.0.0", at(T0 - HOUR), at(T0 + 2 * HOUR)
            )

    aggregates = run(url, body)
    assert aggregates.labelled_rows.tolist() == [55]
    assert aggregates.labelled_correct.tolist() == [49]
    assert aggregates.windows.tolist() == [1]


def test_labels_posted_and_corrected_reach_the_aggregates_once(url: str) -> None:
    w = window("a", T0)

    def labels(counts: list[list[int]]) -> WindowLabelsBody:
        return WindowLabelsBody(window_id=w.window_id, classes=list(CLASSES), counts=counts)

    async def body(db: Database) -> store.DeviceAggregates:
        await register(db, "a")
        await write_batch(db, [accepted(w)], "r1")
        async with db.session() as session:
            await post_labels(session, [labels([[4, 1], [1, 4]])], "operator")
        async with db.session() as session:  # a correction replaces them
            await post_labels(session, [labels([[5, 0], [2, 3]])], "operator")
        async with db.session() as session:
            return await store.device_aggregates(
                session, "vibration", "2.0.0", at(T0 - HOUR), at(T0 + HOUR)
            )

    aggregates = run(url, body)
    assert aggregates.labelled_rows.tolist() == [10]
    assert aggregates.labelled_correct.tolist() == [8]


def same(a: store.DeviceAggregates, b: store.DeviceAggregates) -> None:
    """Two aggregates hold the same devices and the same sums, field by field."""
    assert a.device_ids == b.device_ids and a.classes == b.classes
    for name in ("windows", "requests", "fallbacks", "errors", "unsummarised_requests",
                 "latency_zero", "latency_min", "latency_max", "latency", "scores",
                 "labelled_rows", "labelled_correct"):  # fmt: skip
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    # A float sum's last bit depends on the order it is added in (no gate reads it).
    assert np.allclose(a.latency_sum, b.latency_sum, rtol=1e-12, atol=0)


class CountingKept(KeptAggregates):
    """Kept sums that note which received hours each of their reads asked for."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        super().__init__(clock)
        self.asked: list[tuple[datetime, datetime | None, datetime | None]] = []

    async def _rows(
        self,
        session: AsyncSession,
        key: Range,
        since: datetime,
        until: datetime,
        received: tuple[datetime | None, datetime | None],
    ) -> store.DeviceAggregates:
        self.asked.append((since, *received))
        return await super()._rows(session, key, since, until, received)


def test_kept_sums_plus_the_rows_received_since_are_every_rows_sums(url: str) -> None:
    start = at(T0)  # the rollout starts 20:40
    now = [start]
    kept = CountingKept(lambda: now[0])

    async def receive(session: AsyncSession, *windows: WindowSummary) -> None:
        await store.add_to_hour_stats(session, [fold(w) for w in windows], received_at=now[0])

    async def check(session: AsyncSession) -> None:
        for since, until in ((start, now[0]), (start - timedelta(hours=24), start)):
            full = await store.device_aggregates(session, "vibration", "2.0.0", since, until)
            same(await kept.read(session, "vibration", "2.0.0", since, until), full)

    async def body(db: Database) -> list[tuple[datetime, datetime | None, datetime | None]]:
        async with db.session() as session:
            await receive(session, window("a", T0 - 3 * HOUR), window("b", T0 - 600))
            await check(session)
            for minutes in range(10, 5 * 60, 25):  # ticks over five hours
                now[0] = start + timedelta(minutes=minutes)
                t = now[0].timestamp()
                await receive(session, window("a", t - 30), window("b", t - 90, fallbacks=9))
                if minutes == 135:  # a's backlog: windows of hours that ended long ago
                    await receive(session, window("a", T0 - 2 * HOUR), window("a", T0 + 600))
                if minutes == 185:  # labels of an hour that ended, and a clock running ahead
                    await store.add_labels(
                        session, "b", "vibration", "2.0.0", at(T0 + 900), 30, 27, now[0]
                    )
                    await receive(session, window("b", t + 2 * HOUR))
                await check(session)
            kept.asked.clear()
            now[0] += timedelta(minutes=1)
            await check(session)
        return kept.asked

    asked = run(url, body)
    # Once kept, a tick reads only the rows received in the hour still open, and those of
    # hours past the kept ones (the future-dated), never the finished ones again.
    finished = datetime(2026, 5, 29, 1, tzinfo=UTC)
    assert asked and all(
        (low is not None and low >= finished) or (low is None and since >= finished)
        for since, low, _ in asked
    ), asked


async def create(
    session: AsyncSession, rollout_id: str, name: str, now: datetime, **fields: Any
) -> None:
    """A rollout row of release vibration 2.0.0, running, with ``fields`` overriding."""
    values: dict[str, Any] = {
        "release_name": "vibration",
        "release_version": "2.0.0",
        "spec": {},
        "state": {},
        "phase": "running",
        "created_by": "ops",
    }
    await store.create_rollout(
        session, rollout_id=rollout_id, name=name, now=now, **(values | fields)
    )


def test_a_rollout_is_created_listed_and_advanced_by_one_writer_only(url: str) -> None:
    now = at(T0)

    async def body(db: Database) -> None:
        async with db.session() as session:
            for i, name in enumerate(["first", "second"]):
                await create(
                    session,
                    f"r{i}",
                    name,
                    now + timedelta(minutes=i),
                    spec={"waves": [0.01, 0.1, 1.0]},
                    state={"stage": 0},
                )
        with pytest.raises(IntegrityError):
            async with db.session() as session:
                await create(session, "r9", "first", now, release_version="3.0.0")
        async with db.session() as session:
            assert [r.name for r in await store.list_rollouts(session)] == ["second", "first"]
            r0 = await store.get_rollout(session, "r0")
            assert r0 is not None and r0.revision == 0 and r0.spec == {"waves": [0.01, 0.1, 1.0]}
            assert (await store.rollout_by_name(session, "second")) is not None
            assert await store.get_rollout(session, "nope") is None
        # Two replicas read revision 0; the first to save wins, the other is told so.
        async with db.session() as session:
            revision = await store.save_state(
                session, "r0", read_revision=0, state={"stage": 1}, phase="running", now=now
            )
            assert revision == 1
        with pytest.raises(store.StaleRollout):
            async with db.session() as session:
                await store.save_state(
                    session, "r0", read_revision=0, state={"stage": 9}, phase="stopped", now=now
                )
        async with db.session() as session:
            await store.save_state(
                session, "r1", read_revision=0, state={}, phase="paused", now=now
            )
        async with db.session() as session:
            r0 = await store.get_rollout(session, "r0")
            assert r0 is not None
            assert (r0.revision, r0.state, r0.phase) == (1, {"stage": 1}, "running")
            paused = await store.list_rollouts(session, phases=["paused"])
            assert [r.id for r in paused] == ["r1"]

    run(url, body)


def test_a_device_is_reached_once_and_keeps_what_it_ran_before(url: str) -> None:
    now = at(T0)

    async def body(db: Database) -> None:
        async with db.session() as session:
            await create(session, "r0", "first", now)
            added = await store.add_reached(
                session,
                "r0",
                [
                    store.Reached("b", 0, "vibration-1.0.0.tar", "vibration@1.0.0"),
                    store.Reached("a", 0, None, None),
                ],
                now,
            )
            assert added == ["a", "b"]
        async with db.session() as session:
            # A replayed tick, and the next stage naming a device reached before.
            added = await store.add_reached(
                session,
                "r0",
                [store.Reached("b", 1, "other", "other"), store.Reached("c", 1)],
                now + timedelta(minutes=30),
            )
            assert added == ["c"]
            assert await store.add_reached(session, "r0", [], now) == []
        async with db.session() as session:
            reached = await store.reached_devices(session, "r0")
            assert [(d.device_id, d.stage) for d in reached] == [("a", 0), ("b", 0), ("c", 1)]
            assert reached[1].previous_target == "vibration-1.0.0.tar"
            assert reached[1].previous_bundle == "vibration@1.0.0"
            assert reached[1].assigned_at == now

    run(url, body)


def test_an_evaluation_is_recorded_once_per_tick(url: str) -> None:
    now = at(T0)
    gate = GateEvaluation(
        gate="fallback_rate",
        severity="stop",
        decision="inconclusive",
        n_devices=100,
        n_control=9_900,
        n_requests=6_000,
        estimate=0.02,
        low=None,
        high=float("inf"),
        harm_at=0.0953,
        margin=0.0953,
        log_e_harm=float("-inf"),
        log_e_ni=1.5,
        alpha=0.00625,
        beta=0.00625,
        missing="devices",
    )

    async def body(db: Database) -> None:
        async with db.session() as session:
            await create(session, "r0", "first", now)
            assert await store.record_evaluation(
                session, "r0", at=now, stage=0, gates=[gate], rule="inconclusive", action="wait"
            )
            assert not await store.record_evaluation(
                session, "r0", at=now, stage=0, gates=[], rule="other", action="promote"
            )
            assert await store.record_evaluation(
                session,
                "r0",
                at=now + timedelta(minutes=1),
                stage=0,
                gates=[{"gate": "install_failures", "estimate": float("nan")}],
                rule="harm",
                action="stop",
            )
        async with db.session() as session:
            recorded = await store.evaluations(session, "r0")
            assert [(e.rule, e.action) for e in recorded] == [
                ("harm", "stop"),
                ("inconclusive", "wait"),
            ]
            record_ = recorded[1].gates[0]
            assert record_["gate"] == "fallback_rate"
            assert (record_["high"], record_["log_e_harm"], record_["low"]) == ("inf", "-inf", None)
            assert record_["missing"] == "devices"
            assert recorded[0].gates[0]["estimate"] == "nan"
            assert [e.action for e in await store.evaluations(session, "r0", limit=1)] == ["stop"]
            count = await session.scalar(select(func.count()).select_from(RolloutEvaluation))
            assert count == 2

    run(url, body)


def _tables(url: str) -> set[str]:
    async def main() -> set[str]:
        engine = create_async_engine(normalise_url(url))
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_the_migration_goes_down_to_0008_and_up_again(url: str) -> None:
    ours = {"device_hour_stats", "rollouts", "rollout_devices", "rollout_evaluations"}
    assert ours <= _tables(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalise_url(url))
    command.downgrade(config, "0008")
    tables = _tables(url)
    assert not ours & tables
    assert {"windows", "alerts", "silences"} <= tables
    migrate(url)
    assert ours <= _tables(url)
