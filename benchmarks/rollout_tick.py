"""What a rollout tick reads: the hourly aggregates of 100,000 devices on PostgreSQL, over a
bake of many hours.

The fleet (made hour by hour, untimed, in a PostgreSQL database of the run's own,
dropped at the end): ``DEVICES`` devices, each with ``BASELINE_HOURS`` hourly rows
on the current version before the rollout started (its own baseline) and a row
for every hour since, half of them (the 50 % wave) on the new version and half
(the control) on the current one. Each row holds an hour of 60 one-minute windows
of 60 requests folded by :func:`fleet_server.rollouts.aggregates.fold` (latency
about 40 ms, scores over 3 classes), received in its own hour; every hour after
the start, 1 % of the devices also upload a backlog: a row for the hour three
hours earlier, received in the hour then open.

What is measured, at each of ``CHECKPOINTS`` (hours into the bake; the fleet is
filled up to each before it is measured), with the clock half an hour into the
last hour:

- *tick*: the three reads a tick makes (treatment and control since the start,
  everyone's 24-hour baseline) through one
  :class:`~fleet_server.rollouts.kept.KeptAggregates` holding what the rollout's
  earlier ticks kept (made untimed, by one read at four minutes into the hour): the
  rows received in the open hour, added to the sums kept;
- *tick after an hour ends*: the same six minutes into the hour (past the
  :data:`~fleet_server.rollouts.kept.GRACE`), which also reads the hour that just
  ended once and keeps it;
- *all hours*: the same three reads with nothing kept
  (:func:`fleet_server.rollouts.store.device_aggregates` over every row);
- floors, for the open hour's rows: ``SELECT count(*)`` of them (finding them)
  and a bare asyncpg ``fetch`` of them (reading them into Python).

``ROUNDS`` rounds after a warm-up (one round for *all hours*); medians.
``python -m benchmarks.rollout_tick [devices]``.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
from sqlalchemy import func, select

from fleet_server.db import Database, migrate
from fleet_server.db.models import DeviceHourStats
from fleet_server.rollouts import store
from fleet_server.rollouts.aggregates import combine_all, encode_classes, encode_counts, fold
from fleet_server.rollouts.kept import KeptAggregates
from protocol.histogram import ExponentialHistogram, record
from protocol.summary import score_histogram
from protocol.window import WindowSummary

DEVICES = 100_000
BASELINE_HOURS = 24
CHECKPOINTS = (3, 12)  # hours into the bake
TEMPLATES = 97  # distinct hour rows, spread over the devices
ROUNDS = 3
GOAL_S = 1.0
MODEL = "pump-health"
CURRENT, NEW = "1.0.0", "1.1.0"
START = datetime(2026, 6, 1, 12, tzinfo=UTC)  # the rollout's start
BACKLOG_EVERY = 100  # one device in this many uploads an old hour every hour
CLASSES = ["ok", "worn", "fault"]
POSTGRES_SERVER = os.environ.get("EDGEFLEET_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def hour_templates() -> list[dict[str, Any]]:
    """``TEMPLATES`` hour rows, each 60 windows of 60 requests folded as ingest folds them."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(TEMPLATES):
        windows = []
        device_scale = rng.gamma(4.0, 0.25)
        for m in range(60):
            requests = 60
            fallbacks = int(rng.binomial(requests, 0.02 * device_scale))
            windows.append(
                WindowSummary(
                    window_id=f"t{k}-{m}",
                    device_id="template",
                    model_name=MODEL,
                    model_version=CURRENT,
                    baseline_id="b",
                    start=m * 60.0,
                    end=m * 60.0 + 59.0,
                    requests=requests,
                    errors=int(rng.binomial(requests, 0.001)),
                    served={"active": requests - fallbacks, "previous": fallbacks},
                    features=[],
                    scores=score_histogram(rng.dirichlet([4.0, 1.0, 0.5], size=requests), CLASSES),
                    latency_ms=record(
                        ExponentialHistogram(), rng.lognormal(math.log(40.0), 0.25, requests)
                    ),
                )
            )
        (hour,) = combine_all(fold(w) for w in windows).values()
        out.append(
            {
                "k": k,
                "windows": hour.windows,
                "requests": hour.requests,
                "fallbacks": hour.fallbacks,
                "errors": hour.errors,
                "latency_zero": hour.latency_zero,
                "latency_sum": hour.latency_sum,
                "latency_min": hour.latency_min,
                "latency_max": hour.latency_max,
                "latency": encode_counts(hour.latency),
                "score_classes": encode_classes(hour.score_classes),
                "scores": encode_counts(hour.scores),
            }
        )
    return out


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(f"{POSTGRES_SERVER}/postgres", timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def populate(url: str, devices: int, hours: range) -> float:
    """Add the rows of ``hours`` (relative to the start), hour by hour; seconds taken."""
    templates = hour_templates()
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "CREATE TEMP TABLE tpl (k int, windows bigint, requests bigint, fallbacks bigint,"
            " errors bigint, latency_zero bigint, latency_sum float8, latency_min float8,"
            " latency_max float8, latency bytea, score_classes text, scores bytea)"
        )
        await connection.copy_records_to_table(
            "tpl",
            records=[tuple(t.values()) for t in templates],
            columns=list(templates[0]),
        )
        started = time.perf_counter()
        for h in hours:
            # Every device's row of hour h, received in it; after the start, the backlog of
            # one device in BACKLOG_EVERY: its row of hour h - 3, received in hour h.
            for late, where in ((0, "true"), (3, f"$2 >= 0 AND d % {BACKLOG_EVERY} = 1")):
                await connection.execute(
                    f"""
                    INSERT INTO device_hour_stats (model_name, model_version, hour, device_id,
                        received_hour, windows, requests, fallbacks, errors,
                        unsummarised_requests, latency_zero, latency_sum, latency_min,
                        latency_max, latency, score_classes, scores, labelled_rows,
                        labelled_correct)
                    SELECT $1,
                           CASE WHEN $2 - {late} >= 0 AND d % 2 = 0 THEN $3 ELSE $4 END,
                           $5::timestamptz - interval '{late} hours',
                           'dev-' || lpad(d::text, 6, '0'),
                           $5::timestamptz,
                           t.windows, t.requests, t.fallbacks, t.errors, 0, t.latency_zero,
                           t.latency_sum, t.latency_min, t.latency_max, t.latency,
                           t.score_classes, t.scores, 0, 0
                    FROM generate_series(0, $6 - 1) AS d
                    JOIN tpl t ON t.k = (d * 7 + $2 + 1000) % $7
                    WHERE {where}
                    ORDER BY d
                    """,
                    MODEL,
                    h,
                    NEW,
                    CURRENT,
                    START + timedelta(hours=h),
                    devices,
                    TEMPLATES,
                )
        filled = time.perf_counter() - started
        await connection.execute("VACUUM ANALYZE device_hour_stats")
    finally:
        await connection.close()
    return filled


BARE_SELECT = (
    "SELECT device_id, windows, requests, fallbacks, errors, unsummarised_requests,"
    " latency_zero, latency_sum, latency_min, latency_max, latency, score_classes, scores,"
    " labelled_rows, labelled_correct FROM device_hour_stats"
    " WHERE model_name = $1 AND model_version = ANY($2) AND received_hour >= $3"
)
READS = (
    (NEW, timedelta(0), None),  # treatment: since the start, up to now
    (CURRENT, timedelta(0), None),  # control
    (CURRENT, -timedelta(hours=BASELINE_HOURS), timedelta(0)),  # baseline
)


class Clock:
    """The server's clock, set by the benchmark."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def tick_reads(db: Database, kept: KeptAggregates | None, now: datetime) -> tuple[int, int]:
    """A tick's three reads at ``now`` (every row when ``kept`` is None); the devices and
    windows they found."""
    found = windows = 0
    async with db.session() as session:
        for version, since, until in READS:
            end = now if until is None else START + until
            if kept is None:
                got = await store.device_aggregates(session, MODEL, version, START + since, end)
            else:
                got = await kept.read(session, MODEL, version, START + since, end)
            found += len(got)
            windows += int(got.windows.sum())
    return found, windows


async def measure(db: Database, url: str, hours: int) -> dict[str, float]:
    """The figures at ``hours`` into the bake (the fleet filled up to then)."""
    t = DeviceHourStats
    now = START + timedelta(hours=hours - 0.5)
    after_hour = START + timedelta(hours=hours - 1, minutes=6)  # past the grace
    clock = Clock(after_hour - timedelta(minutes=2))
    kept = KeptAggregates(clock)
    # What the rollout's earlier ticks kept, by four minutes into the last hour (the sums kept
    # depend only on the hours finished, not on when the ticks ran); untimed.
    await tick_reads(db, kept, clock.now)
    before_hour = dict(kept._kept)
    clock.now = after_hour
    await tick_reads(db, kept, after_hour)
    in_hour = dict(kept._kept)
    checks: dict[str, float] = {}

    async def tick() -> None:
        kept._kept = dict(in_hour)
        clock.now = now
        checks["devices"], checks["windows"] = await tick_reads(db, kept, now)

    async def tick_after_hour() -> None:
        kept._kept = dict(before_hour)
        clock.now = after_hour
        await tick_reads(db, kept, after_hour)

    async def full() -> None:
        checks["devices_full"], checks["windows_full"] = await tick_reads(db, None, now)

    async def count() -> None:
        async with db.session() as session:
            checks["rows_open"] = int(
                await session.scalar(
                    select(func.count())
                    .select_from(t)
                    .where(
                        t.model_name == MODEL,
                        t.model_version.in_([NEW, CURRENT]),
                        t.received_hour >= now.replace(minute=0),
                    )
                )
                or 0
            )

    async def fetch() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.fetch(BARE_SELECT, MODEL, [NEW, CURRENT], now.replace(minute=0))
        finally:
            await connection.close()

    async with db.session() as session:
        checks["rows"] = int(await session.scalar(select(func.count()).select_from(t)) or 0)
    measured: dict[str, Callable[[], Awaitable[None]]] = {
        "tick": tick,
        "tick_after_hour": tick_after_hour,
        "count": count,
        "fetch": fetch,
    }
    times: dict[str, list[float]] = {name: [] for name in [*measured, "full"]}
    for round_ in range(ROUNDS + 1):
        names = list(measured)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            started = time.perf_counter()
            await measured[name]()
            if round_:
                times[name].append(time.perf_counter() - started)
    started = time.perf_counter()
    await full()
    times["full"].append(time.perf_counter() - started)
    result = {name: statistics.median(values) for name, values in times.items()}
    result.update({f"{name}_max": max(values) for name, values in times.items()})
    result.update(checks)
    return result


def run(devices: int = DEVICES) -> dict[int, dict[str, float]]:
    """Make the database, fill and measure at each checkpoint, drop it; figures by hours."""
    name = f"edgefleet_bench_tick_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = f"{POSTGRES_SERVER}/{name}"
    out: dict[int, dict[str, float]] = {}
    try:
        migrate(url)
        filled_to = -BASELINE_HOURS
        for hours in CHECKPOINTS:
            fill_s = asyncio.run(populate(url, devices, range(filled_to, hours)))
            filled_to = hours

            async def main(hours: int = hours) -> dict[str, float]:
                db = Database(url)
                try:
                    return await measure(db, url, hours)
                finally:
                    await db.close()

            out[hours] = {"fill_s": fill_s, **asyncio.run(main())}
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return out


def main(devices: int = DEVICES) -> None:
    figures = run(devices)
    for hours, r in figures.items():
        print(
            f"{devices:,} devices, {hours} h into the bake: {int(r['rows']):,} rows "
            f"(filled in {r['fill_s']:.0f} s); open hour {int(r['rows_open']):,} rows; "
            f"median of {ROUNDS} rounds"
        )
        for label, key in [
            ("tick (kept + the open hour)", "tick"),
            ("tick after an hour ends (+ that hour, once)", "tick_after_hour"),
            ("all hours, nothing kept (1 round)", "full"),
            ("asyncpg fetch of the open hour's rows", "fetch"),
            ("count(*) of the open hour's rows (floor)", "count"),
        ]:
            print(
                f"  {label:46} {r[key] * 1000:8.0f} ms  {r[key] / r['fetch']:6.2f}x fetch  "
                f"{r[key] / r['count']:6.1f}x count  (slowest {r[f'{key}_max'] * 1000:.0f} ms)"
            )
        print(
            f"  devices, windows read (3 reads): kept {int(r['devices']):,}, "
            f"{int(r['windows']):,}; all hours {int(r['devices_full']):,}, "
            f"{int(r['windows_full']):,}"
        )
        verdict = "met" if r["tick"] <= GOAL_S else "NOT met"
        print(f"  goal: tick <= {GOAL_S:g} s: {verdict}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else DEVICES)
