"""What a rollout tick reads: the hourly aggregates of 100,000 devices on PostgreSQL.

The fleet (made once, untimed, in a PostgreSQL database of the run's own, dropped
at the end): ``DEVICES`` devices, each with ``BASELINE_HOURS`` hourly rows on the
current version before the rollout started (its own baseline) and
``AFTER_HOURS`` rows since, half of them (the 50 % wave) on the new version and
half (the control) on the current one: ``DEVICES * (BASELINE_HOURS + AFTER_HOURS)``
rows. Each row holds an hour of 60 one-minute windows of 60 requests folded by
:func:`fleet_server.rollouts.aggregates.fold` (latency about 40 ms, scores over
3 classes); rows are inserted hour by hour, as ingest writes them.

What is measured, each over the same rows and the same list of 100,000 device
ids:

- *tick*: the three reads of a tick through
  :func:`fleet_server.rollouts.store.device_aggregates` (treatment on the new
  version since the start, control on the current version since the start, and
  everyone's baseline over the 24 hours before), each one query returning a row
  per device, summed into :class:`~fleet_server.rollouts.aggregates.DeviceAggregates`;
- *tick, baseline kept*: the treatment and control reads only (a baseline does
  not change once its hours are over, so a controller may read it once);
- floors: *count*, ``SELECT count(*)`` over the same rows (the least any read
  of them costs: finding them); *scalar sums*, the same ``GROUP BY device``
  summing the counters only (no histograms).

``ROUNDS`` rounds after a warm-up, the order rotating; medians, and each
figure's ratio to *count*.
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
from fleet_server.rollouts.aggregates import (
    DeviceAggregates,
    add,
    combine_all,
    encode_classes,
    encode_counts,
    fold,
)
from protocol.histogram import ExponentialHistogram, record
from protocol.summary import score_histogram
from protocol.window import WindowSummary

DEVICES = 100_000
BASELINE_HOURS = 24
AFTER_HOURS = 3
TEMPLATES = 97  # distinct hour rows, spread over the devices
ROUNDS = 3
GOAL_S = 1.0
MODEL = "pump-health"
CURRENT, NEW = "1.0.0", "1.1.0"
START = datetime(2026, 6, 1, 12, tzinfo=UTC)  # the rollout's start
NOW = START + timedelta(hours=AFTER_HOURS - 0.5)  # in the last hour
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


async def populate(url: str, devices: int) -> dict[str, float]:
    """Fill the database (hour by hour, devices in id order within an hour); its size."""
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
        for h in range(-BASELINE_HOURS, AFTER_HOURS):
            await connection.execute(
                """
                INSERT INTO device_hour_stats
                SELECT $1,
                       CASE WHEN $2 >= 0 AND d % 2 = 0 THEN $3 ELSE $4 END,
                       $5::timestamptz,
                       'dev-' || lpad(d::text, 6, '0'),
                       t.windows, t.requests, t.fallbacks, t.errors, 0, t.latency_zero,
                       t.latency_sum, t.latency_min, t.latency_max, t.latency,
                       t.score_classes, t.scores, 0, 0
                FROM generate_series(0, $6 - 1) AS d
                JOIN tpl t ON t.k = (d * 7 + $2 + 1000) % $7
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
        rows = await connection.fetchval("SELECT count(*) FROM device_hour_stats")
        size = await connection.fetchval("SELECT pg_total_relation_size('device_hour_stats')")
    finally:
        await connection.close()
    return {"rows": float(rows), "bytes": float(size), "fill_s": filled}


Reads = tuple[tuple[str, str, datetime, datetime], ...]
BARE_SELECT = (
    "SELECT device_id, windows, requests, fallbacks, errors, unsummarised_requests,"
    " latency_zero, latency_sum, latency_min, latency_max, latency, score_classes, scores,"
    " labelled_rows, labelled_correct FROM device_hour_stats"
    " WHERE model_name = $1 AND model_version = $2 AND hour >= $3 AND hour < $4"
)
CURRENT_HOUR = NOW - timedelta(minutes=30)
FULL = (
    ("treatment", NEW, START, NOW),
    ("control", CURRENT, START, NOW),
    ("baseline", CURRENT, START - timedelta(hours=BASELINE_HOURS), START),
)
# What a tick reads: the hour now open, or it and the one before (late windows).
OPEN_HOURS = (("treatment", NEW, CURRENT_HOUR, NOW), ("control", CURRENT, CURRENT_HOUR, NOW))
TWO_HOURS = (
    ("treatment", NEW, CURRENT_HOUR - timedelta(hours=1), NOW),
    ("control", CURRENT, CURRENT_HOUR - timedelta(hours=1), NOW),
)
KEPT_HOURS = (("treatment", NEW, START, CURRENT_HOUR), ("control", CURRENT, START, CURRENT_HOUR))


async def measure(db: Database, url: str, ids: list[str]) -> dict[str, float]:
    t = DeviceHourStats
    checks: dict[str, float] = {}

    async def read(reads: Reads) -> dict[str, DeviceAggregates]:
        async with db.session() as session:
            return {
                name: await store.device_aggregates(
                    session, MODEL, version, since, until, devices=ids
                )
                for name, version, since, until in reads
            }

    kept = await read(KEPT_HOURS)

    async def full() -> None:
        for name, got in (await read(FULL)).items():
            checks[f"{name}_devices"] = len(got)

    async def incremental() -> None:
        now = await read(OPEN_HOURS)
        for name, got in now.items():
            both = add(kept[name], got)
            checks[f"{name}_windows"] = float(both.windows.sum())

    async def two_hours() -> None:
        await read(TWO_HOURS)

    def counter(reads: Reads, key: str) -> Callable[[], Awaitable[None]]:
        async def count() -> None:
            async with db.session() as session:
                total = 0
                for _, version, since, until in reads:
                    total += int(
                        await session.scalar(
                            select(func.count())
                            .select_from(t)
                            .where(
                                t.model_name == MODEL,
                                t.model_version == version,
                                t.hour >= since,
                                t.hour < until,
                            )
                        )
                        or 0
                    )
                checks[key] = total

        return count

    def fetcher(reads: Reads) -> Callable[[], Awaitable[None]]:
        async def fetch() -> None:
            connection = await asyncpg.connect(url)
            try:
                for _, version, since, until in reads:
                    await connection.fetch(BARE_SELECT, MODEL, version, since, until)
            finally:
                await connection.close()

        return fetch

    measured: dict[str, Callable[[], Awaitable[None]]] = {
        "full": full,
        "count_full": counter(FULL, "rows_full"),
        "fetch_full": fetcher(FULL),
        "tick": incremental,
        "count_tick": counter(OPEN_HOURS, "rows_tick"),
        "fetch_tick": fetcher(OPEN_HOURS),
        "two": two_hours,
        "count_two": counter(TWO_HOURS, "rows_two"),
        "fetch_two": fetcher(TWO_HOURS),
    }
    times: dict[str, list[float]] = {name: [] for name in measured}
    for round_ in range(ROUNDS + 1):
        names = list(measured)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            started = time.perf_counter()
            await measured[name]()
            if round_:
                times[name].append(time.perf_counter() - started)
    result = {name: statistics.median(values) for name, values in times.items()}
    result.update({f"{name}_max": max(values) for name, values in times.items()})
    result.update(checks)
    return result


def run(devices: int = DEVICES) -> dict[str, float]:
    """Make the database, fill it, measure, drop it; the figures (seconds, counts)."""
    name = f"edgefleet_bench_tick_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = f"{POSTGRES_SERVER}/{name}"
    try:
        migrate(url)
        filled = asyncio.run(populate(url, devices))

        async def main() -> dict[str, float]:
            db = Database(url)
            try:
                return await measure(db, url, [f"dev-{d:06d}" for d in range(devices)])
            finally:
                await db.close()

        return filled | asyncio.run(main())
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main(devices: int = DEVICES) -> None:
    r = run(devices)
    print(
        f"{devices:,} devices x ({BASELINE_HOURS} baseline + {AFTER_HOURS} later) hour rows = "
        f"{int(r['rows']):,} rows, {r['bytes'] / 2**20:.0f} MiB (filled in {r['fill_s']:.0f} s); "
        f"median of {ROUNDS} rounds"
    )
    for label, key, floor in [
        (f"all hours: {int(r['rows_full']):,} rows", "full", "count_full"),
        ("  asyncpg fetch of the same rows", "fetch_full", "count_full"),
        ("  count(*) of the same rows (floor)", "count_full", "count_full"),
        (f"tick, the open hour + kept: {int(r['rows_tick']):,} rows", "tick", "count_tick"),
        ("  asyncpg fetch of the same rows", "fetch_tick", "count_tick"),
        ("  count(*) of the same rows (floor)", "count_tick", "count_tick"),
        (f"the last two hours: {int(r['rows_two']):,} rows", "two", "count_two"),
        ("  asyncpg fetch of the same rows", "fetch_two", "count_two"),
        ("  count(*) of the same rows (floor)", "count_two", "count_two"),
    ]:
        print(
            f"  {label:44} {r[key] * 1000:7.0f} ms  {r[key] / r[floor]:5.2f}x  "
            f"(slowest {r[f'{key}_max'] * 1000:.0f} ms)"
        )
    print(
        "  devices read (treatment, control, baseline): "
        f"{int(r['treatment_devices']):,}, {int(r['control_devices']):,}, "
        f"{int(r['baseline_devices']):,}"
    )
    verdict = "met" if r["tick"] <= GOAL_S else "NOT met"
    print(f"  goal: tick <= {GOAL_S:g} s: {verdict}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else DEVICES)
