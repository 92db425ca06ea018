"""The rollouts feature's store: rollouts, the devices they reached, their evaluations, and the
hourly per-device window aggregates a tick reads.

Every function works in the caller's session (and so its transaction). Upserts use
each dialect's ``INSERT ... ON CONFLICT``, so the same code runs on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    LargeBinary,
    case,
    cast,
    func,
    literal_column,
    select,
    type_coerce,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.bulk import BulkStatement
from fleet_server.db.dialects import dialect_insert, insert_for, on_postgres
from fleet_server.db.models import (
    DeviceHourStats,
    RolloutDevice,
    RolloutEvaluation,
    RolloutRow,
    as_utc,
)
from fleet_server.errors import Conflict
from fleet_server.rollouts.aggregates import (
    AggregateDelta,
    DeviceAggregates,
    Key,
    ShadowAggregates,
    combine_all,
    encode_classes,
    encode_counts,
    hour_of,
    sum_rows,
    sum_shadow_rows,
)
from fleet_server.rollouts.verdicts import GateEvaluation

# SQLite takes at most 32,766 bound values in a statement.
_SQLITE_CHUNK = 10_000


# --- hourly aggregates ---------------------------------------------------------------------


def _values_of(d: AggregateDelta, received_hour: datetime) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "model_name": d.model_name,
        "model_version": d.model_version,
        "hour": d.hour,
        "received_hour": received_hour,
        "windows": d.windows,
        "requests": d.requests,
        "fallbacks": d.fallbacks,
        "errors": d.errors,
        "unsummarised_requests": d.unsummarised_requests,
        "latency_zero": d.latency_zero,
        "latency_sum": d.latency_sum,
        "latency_min": d.latency_min,
        "latency_max": d.latency_max,
        "latency": encode_counts(d.latency),
        "score_classes": encode_classes(d.score_classes),
        "scores": encode_counts(d.scores),
        "labelled_rows": d.labelled_rows,
        "labelled_correct": d.labelled_correct,
        "shadow_requests": d.shadow_requests,
        "shadow_agreements": d.shadow_agreements,
        "shadow_errors": d.shadow_errors,
        "shadow_latency": encode_counts(d.shadow_latency) if d.shadow_latency else None,
    }


_KEY_COLUMNS = ("model_name", "model_version", "hour", "device_id", "received_hour")


def received_hour_of(at: datetime | None) -> datetime:
    """The received hour of rows written at ``at`` (default: now, the server's clock)."""
    return hour_of((as_utc(at) if at is not None else datetime.now(UTC)).timestamp())


# The hourly rows as a table: ingest reads and writes them through Core, as plain rows and
# parameter sets, without the ORM's objects and per-row bookkeeping.
_HOURS: Final = DeviceHourStats.__table__


def _summed_upsert(postgres: bool) -> Any:
    """``INSERT ... ON CONFLICT`` of a batch's sums per row, added to a stored row by the
    database: counts summed, extremes kept, histogram pairs appended.

    Every ``SET`` reads the row as stored (before this statement), on both dialects.
    A histogram column may so hold more than one pair per cell: every reader sums
    its pairs (:func:`~fleet_server.rollouts.aggregates.decode_counts`, ``sum_rows``),
    so the row means what ``combine`` of the stored row and the batch would store.
    Scores over other classes than the stored row's are left out (see ``combine``).
    """
    insert: Any = insert_for(postgres)
    statement = insert(_HOURS)
    new, t = statement.excluded, _HOURS.c
    summed: dict[str, Any] = {
        name: t[name] + new[name]
        for name in (
            "windows",
            "requests",
            "fallbacks",
            "errors",
            "unsummarised_requests",
            "latency_zero",
            "latency_sum",
            "labelled_rows",
            "labelled_correct",
        )
    }
    for name in ("shadow_requests", "shadow_agreements", "shadow_errors"):
        summed[name] = func.coalesce(t[name], literal_column("0")) + new[name]
    summed["latency_min"] = _extreme(t.latency_min, new.latency_min, lower=True)
    summed["latency_max"] = _extreme(t.latency_max, new.latency_max, lower=False)
    summed["latency"] = _appended(t.latency, new.latency)
    summed["score_classes"] = func.coalesce(t.score_classes, new.score_classes)
    summed["scores"] = case(
        (t.score_classes.is_(None), new.scores),
        (t.score_classes == new.score_classes, _appended(t.scores, new.scores)),
        else_=t.scores,
    )
    summed["shadow_latency"] = case(
        (new.shadow_latency.is_(None), t.shadow_latency),
        (t.shadow_latency.is_(None), new.shadow_latency),
        else_=_appended(t.shadow_latency, new.shadow_latency),
    )
    return statement.on_conflict_do_update(index_elements=list(_KEY_COLUMNS), set_=summed)


def _extreme(stored: Any, added: Any, *, lower: bool) -> Any:
    """The lower (or higher) of two nullable values, ``NULL`` only when both are."""
    return case(
        (stored.is_(None), added),
        (added.is_(None), stored),
        ((added < stored) if lower else (added > stored), added),
        else_=stored,
    )


def _appended(stored: Any, added: Any) -> Any:
    """Packed pairs appended to stored ones (bytes on both dialects: SQLite's ``||`` makes
    text of blobs, cast back without changing a byte)."""
    return type_coerce(cast(stored.op("||")(added), LargeBinary), LargeBinary)


_SUMMED_UPSERT: Final = {postgres: _summed_upsert(postgres) for postgres in (False, True)}
# The upserts' parameters in the table's column order, run through the driver (rows as tuples).
_ROW: Final = operator.itemgetter(*_HOURS.c.keys())
_BULK_UPSERT: Final = {
    postgres: BulkStatement(statement, _HOURS.c.keys())
    for postgres, statement in _SUMMED_UPSERT.items()
}


async def add_to_hour_stats(
    session: AsyncSession, deltas: Sequence[AggregateDelta], received_at: datetime | None = None
) -> None:
    """Add ``deltas`` to their hourly rows of the hour they are received in (``received_at``,
    default now), creating the rows that do not exist yet.

    The deltas are summed per row first; the database adds each sum to its stored
    row (:func:`_summed_upsert`) without it being read here. Rows are written in key order,
    under the row locks of the deltas' devices that the caller holds (ingest's batch
    writer does, :func:`fleet_server.mqtt.store.lock_devices`).
    """
    merged = combine_all(deltas)
    if not merged:
        return
    received = received_hour_of(received_at)
    keys: list[Key] = sorted(merged, key=lambda k: (k[1], k[2], k[3], k[0]))
    await _BULK_UPSERT[on_postgres(session)].execute(
        session, [_ROW(_values_of(merged[k], received)) for k in keys]
    )


async def add_labels(
    session: AsyncSession,
    device_id: str,
    model_name: str,
    model_version: str,
    window_end: datetime,
    rows: int,
    correct: int,
    received_at: datetime | None = None,
) -> None:
    """Add labelled rows (and how many of them the model got right) to the hour of the window
    they label, in the row of the hour they are received in (``received_at``, default now);
    negative values take back labels that a correction replaced."""
    table = DeviceHourStats
    insert = dialect_insert(session)
    statement = insert(table).values(
        _values_of(
            AggregateDelta(
                device_id=device_id,
                model_name=model_name,
                model_version=model_version,
                hour=hour_of(as_utc(window_end).timestamp()),
                labelled_rows=rows,
                labelled_correct=correct,
            ),
            received_hour_of(received_at),
        )
    )
    statement = statement.on_conflict_do_update(
        index_elements=list(_KEY_COLUMNS),
        set_={
            "labelled_rows": table.labelled_rows + statement.excluded.labelled_rows,
            "labelled_correct": table.labelled_correct + statement.excluded.labelled_correct,
        },
    )
    await session.execute(statement)


# device_aggregates' query on PostgreSQL, for the driver itself; the columns of HourRow.
_PG_HOUR_ROWS = (
    "SELECT device_id, windows, requests, fallbacks, errors, unsummarised_requests,"
    " latency_zero, latency_sum, latency_min, latency_max, latency, score_classes, scores,"
    " labelled_rows, labelled_correct FROM device_hour_stats"
    " WHERE model_name = $1 AND model_version = $2 AND hour >= $3 AND hour < $4"
    " AND received_hour >= $5 AND received_hour < $6"
)
# Received hours that bound nothing.
_EVER = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))


async def device_aggregates(
    session: AsyncSession,
    model_name: str,
    model_version: str,
    since: datetime,
    until: datetime,
    devices: Collection[str] | None = None,
    received: tuple[datetime | None, datetime | None] = (None, None),
) -> DeviceAggregates:
    """Per device of ``devices`` (default: every device), the sums of its hourly rows of
    ``model_name@model_version`` for the hours from the one ``since`` falls in up to
    ``until`` (exclusive), of those received from ``received[0]`` up to ``received[1]``
    (exclusive; ``None``: unbounded). One query on PostgreSQL; on SQLite a query per
    10,000 devices. The rows are summed here, with numpy: summing in SQL would move as
    many histogram bytes and cost a sort. Devices without rows are absent from the result.
    """
    received_from = received[0] if received[0] is not None else _EVER[0]
    received_before = received[1] if received[1] is not None else _EVER[1]
    t = DeviceHourStats
    query = select(
        t.device_id,
        t.windows,
        t.requests,
        t.fallbacks,
        t.errors,
        t.unsummarised_requests,
        t.latency_zero,
        t.latency_sum,
        t.latency_min,
        t.latency_max,
        t.latency,
        t.score_classes,
        t.scores,
        t.labelled_rows,
        t.labelled_correct,
    ).where(
        t.model_name == model_name,
        t.model_version == model_version,
        t.hour >= hour_of(as_utc(since).timestamp()),
        t.hour < as_utc(until),
        t.received_hour >= received_from,
        t.received_hour < received_before,
    )
    # Core, not the ORM: these are plain rows, and the ORM's row loading would double the cost.
    connection = await session.connection()
    rows: list[Any] = []
    if on_postgres(session):
        # The version's rows of the range lie together; the devices are picked here (joined
        # to a list of 100,000 ids, the planner guesses the list small and probes the range
        # once per id). The driver's own records: SQLAlchemy's result rows cost as much as
        # the fetch (benchmarks/rollout_tick.py), and these columns need no conversion.
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        # Planned for the values at hand: a generic plan cannot tell the hour still open
        # (a few rows, by the received-hour index) from a whole range (the primary key).
        await driver.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        rows = await driver.fetch(
            _PG_HOUR_ROWS,
            model_name,
            model_version,
            hour_of(as_utc(since).timestamp()),
            as_utc(until),
            received_from,
            received_before,
        )
        if devices is not None:
            wanted = set(devices)
            rows = [r for r in rows if r[0] in wanted]
    elif devices is None:
        rows.extend((await connection.execute(query)).all())
    else:
        listed = sorted(devices)
        for i in range(0, len(listed), _SQLITE_CHUNK):
            chunk = listed[i : i + _SQLITE_CHUNK]
            rows.extend((await connection.execute(query.where(t.device_id.in_(chunk)))).all())
    return sum_rows(rows)


async def shadow_aggregates(
    session: AsyncSession,
    model_name: str,
    model_version: str,
    since: datetime,
    until: datetime,
    devices: Collection[str],
) -> ShadowAggregates:
    """Per device of ``devices``, the sums of the shadow columns of its hourly rows of
    ``model_name@model_version`` (the shadow's version) over the hours of
    :func:`device_aggregates`; devices without shadow requests are absent."""
    t = DeviceHourStats
    query = select(
        t.device_id, t.shadow_requests, t.shadow_agreements, t.shadow_errors, t.shadow_latency
    ).where(
        t.model_name == model_name,
        t.model_version == model_version,
        t.hour >= hour_of(as_utc(since).timestamp()),
        t.hour < as_utc(until),
        t.shadow_requests > 0,
    )
    connection = await session.connection()
    rows: list[Any] = []
    listed = sorted(devices)
    for i in range(0, len(listed), _SQLITE_CHUNK):
        chunk = listed[i : i + _SQLITE_CHUNK]
        rows.extend((await connection.execute(query.where(t.device_id.in_(chunk)))).all())
    return sum_shadow_rows(rows)


# --- rollouts ------------------------------------------------------------------------------


class StaleRollout(Conflict):
    """The rollout changed since it was read (another replica advanced it)."""


async def create_rollout(
    session: AsyncSession,
    *,
    rollout_id: str,
    name: str,
    release_name: str,
    release_version: str,
    spec: Mapping[str, Any],
    state: Mapping[str, Any],
    phase: str,
    created_by: str,
    now: datetime,
) -> RolloutRow:
    """A new rollout at revision 0 (a name already taken raises the database's IntegrityError)."""
    row = RolloutRow(
        id=rollout_id,
        name=name,
        release_name=release_name,
        release_version=release_version,
        spec=dict(spec),
        state=dict(state),
        phase=phase,
        revision=0,
        created_by=created_by,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    await session.flush()
    return row


async def get_rollout(session: AsyncSession, rollout_id: str) -> RolloutRow | None:
    """The rollout with that id, or ``None``."""
    return await session.get(RolloutRow, rollout_id)


async def rollout_by_name(session: AsyncSession, name: str) -> RolloutRow | None:
    """The rollout with that name, or ``None``."""
    return (await session.scalars(select(RolloutRow).where(RolloutRow.name == name))).first()


async def list_rollouts(
    session: AsyncSession, *, phases: Collection[str] | None = None
) -> list[RolloutRow]:
    """Rollouts, newest first; only those in ``phases`` if given."""
    query = select(RolloutRow).order_by(RolloutRow.created_at.desc(), RolloutRow.id)
    if phases is not None:
        query = query.where(RolloutRow.phase.in_(sorted(phases)))
    return list((await session.scalars(query)).all())


async def save_state(
    session: AsyncSession,
    rollout_id: str,
    *,
    read_revision: int,
    state: Mapping[str, Any],
    phase: str,
    now: datetime,
) -> int:
    """Store the rollout's new state and phase if it is still at ``read_revision``; returns
    the new revision. Raises :class:`StaleRollout` if another writer saved first."""
    result = await session.execute(
        update(RolloutRow)
        .where(RolloutRow.id == rollout_id, RolloutRow.revision == read_revision)
        .values(state=dict(state), phase=phase, revision=read_revision + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise StaleRollout(f"rollout {rollout_id} is no longer at revision {read_revision}")
    return read_revision + 1


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def gate_record(evaluation: GateEvaluation) -> dict[str, Any]:
    """A gate's evaluation as JSON (non-finite numbers as ``"inf"``, ``"-inf"``, ``"nan"``)."""
    return {k: _json_number(v) for k, v in dataclasses.asdict(evaluation).items()}


async def record_evaluation(
    session: AsyncSession,
    rollout_id: str,
    *,
    at: datetime,
    stage: int,
    gates: Sequence[GateEvaluation | Mapping[str, Any]],
    rule: str,
    action: str,
) -> bool:
    """Record one tick's evaluation; ``False`` (and nothing written) if one is already recorded
    for this rollout at ``at`` (a replayed tick)."""
    records = [
        gate_record(g)
        if isinstance(g, GateEvaluation)
        else {k: _json_number(v) for k, v in g.items()}
        for g in gates
    ]
    statement = (
        dialect_insert(session)(RolloutEvaluation)
        .values(
            rollout_id=rollout_id,
            at=as_utc(at),
            stage=stage,
            gates=records,
            rule=rule,
            action=action,
        )
        .on_conflict_do_nothing(index_elements=["rollout_id", "at"])
        .returning(RolloutEvaluation.id)
    )
    return (await session.execute(statement)).first() is not None


async def evaluations(
    session: AsyncSession, rollout_id: str, *, limit: int | None = None
) -> list[RolloutEvaluation]:
    """The rollout's evaluations, newest first (the ``limit`` newest if given)."""
    query = (
        select(RolloutEvaluation)
        .where(RolloutEvaluation.rollout_id == rollout_id)
        .order_by(RolloutEvaluation.at.desc(), RolloutEvaluation.id.desc())
    )
    if limit is not None:
        query = query.limit(limit)
    return list((await session.scalars(query)).all())


@dataclasses.dataclass(frozen=True)
class Reached:
    """A device a tick assigns: the stage, and what it ran before (for a rollback)."""

    device_id: str
    stage: int
    previous_target: str | None = None
    previous_bundle: str | None = None


async def add_reached(
    session: AsyncSession, rollout_id: str, devices: Sequence[Reached], now: datetime
) -> list[str]:
    """Record that the rollout reached ``devices``; a device reached before keeps its first
    record. Returns the ids newly added, in id order."""
    if not devices:
        return []
    by_id = {d.device_id: d for d in devices}
    added: list[str] = []
    insert = dialect_insert(session)
    ids = sorted(by_id)
    for start in range(0, len(ids), _SQLITE_CHUNK // 6):
        chunk = ids[start : start + _SQLITE_CHUNK // 6]
        statement = (
            insert(RolloutDevice)
            .values(
                [
                    {
                        "rollout_id": rollout_id,
                        "device_id": d,
                        "stage": by_id[d].stage,
                        "assigned_at": now,
                        "previous_target": by_id[d].previous_target,
                        "previous_bundle": by_id[d].previous_bundle,
                    }
                    for d in chunk
                ]
            )
            .on_conflict_do_nothing(index_elements=["rollout_id", "device_id"])
            .returning(RolloutDevice.device_id)
        )
        added.extend((await session.scalars(statement)).all())
    return sorted(added)


async def reached_devices(session: AsyncSession, rollout_id: str) -> list[RolloutDevice]:
    """The devices the rollout reached, in id order."""
    return list(
        (
            await session.scalars(
                select(RolloutDevice)
                .where(RolloutDevice.rollout_id == rollout_id)
                .order_by(RolloutDevice.device_id)
            )
        ).all()
    )
