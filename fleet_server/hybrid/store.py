"""The hybrid feature's queries: hourly stats kept by ingest, plans, the cloud's capacity."""

from __future__ import annotations

import json
import operator
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal_column,
    null,
    select,
    type_coerce,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.bulk import BulkStatement
from fleet_server.db.dialects import dialect_insert, insert_for, on_postgres
from fleet_server.db.models import CloudSettings, Device, DeviceHybridStats, HybridPlanRow
from fleet_server.hybrid.aggregates import (
    JSON_COLUMNS,
    HybridDelta,
    Key,
    added_values,
    combine_all,
    delta_of,
    row_values,
)
from protocol.hybrid import CONFIDENCE_BINS
from protocol.summary import SCORE_BIN_COUNT

_CHUNK = 500
_KEY_COLUMNS = ("device_id", "plan_id", "hour")


# The hourly rows as a table: ingest reads and writes them through Core, as plain rows and
# parameter sets, without the ORM's objects and per-row bookkeeping.
_STATS: Final = DeviceHybridStats.__table__


def _upsert(session: AsyncSession) -> Any:
    """``INSERT ... ON CONFLICT`` of whole rows: a stored row takes the new sums."""
    statement = dialect_insert(session)(_STATS)
    return statement.on_conflict_do_update(
        index_elements=list(_KEY_COLUMNS),
        set_={
            c.name: statement.excluded[c.name] for c in _STATS.columns if c.name not in _KEY_COLUMNS
        },
    )


# What a batch's sums need of a stored row besides the columns it adds to: the key and the
# counts (no JSON to decode).
_READ: Final = tuple(c for c in _STATS.columns if c.name not in JSON_COLUMNS)


async def _stored(
    session: AsyncSession, keys: Sequence[Key], added: Sequence[str]
) -> dict[Key, Any]:
    """The stored rows of ``keys``: their counts and the columns ``added`` (rows of those
    columns).

    One query per plan and hour (a batch has one or a few) with the devices
    listed: a list of plain ids rather than of key tuples, which costs
    SQLAlchemy more to expand than the query.
    """
    groups: dict[tuple[str, datetime], list[str]] = {}
    for device_id, plan_id, hour in keys:
        groups.setdefault((plan_id, hour), []).append(device_id)
    connection = await session.connection()
    stored: dict[Key, Any] = {}
    t = _STATS.c
    columns = [*_READ, *(t[name] for name in added)]
    for (plan_id, hour), devices in groups.items():
        for start in range(0, len(devices), _CHUNK):
            rows = await connection.execute(
                select(*columns).where(
                    t.device_id.in_(devices[start : start + _CHUNK]),
                    t.plan_id == plan_id,
                    t.hour == hour,
                )
            )
            for row in rows:
                stored[(row.device_id, plan_id, hour)] = row
    return stored


def _update(added: Sequence[str]) -> Any:
    """An ``UPDATE`` of a stored row's counts and the columns ``added``, by key (the key's
    parameters are ``key_``-prefixed)."""
    t = _STATS.c
    summed = [c.name for c in _READ if c.name not in _KEY_COLUMNS] + list(added)
    return (
        update(DeviceHybridStats)
        .where(
            t.device_id == bindparam("key_device_id"),
            t.plan_id == bindparam("key_plan_id"),
            t.hour == bindparam("key_hour"),
        )
        .values({name: bindparam(name, type_=t[name].type) for name in summed})
    )


def _summed_upsert(postgres: bool) -> Any:
    """``INSERT ... ON CONFLICT`` of a row's sums, added to a stored row by the database:
    counts summed, the later ``last_end`` and the larger ``score_classes`` kept, the
    score histogram added bin by bin; the other JSON columns of a new row are empty,
    and those of a stored row are left as they are (for deltas that add nothing to
    them: :func:`_summed_by_database`). Made once per dialect: its constants are part
    of the statement, not parameters that every row's parameter set would carry."""
    statement = insert_for(postgres)(_STATS).values(
        {name: literal_column(f"'{text}'") for name, text in _EMPTY.items()}
    )
    new, t = statement.excluded, _STATS.c
    greatest = func.greatest if postgres else func.max
    summed: dict[str, Any] = {name: t[name] + new[name] for name in _SUMMED}
    summed["last_end"] = greatest(t.last_end, new.last_end)
    summed["score_classes"] = greatest(t.score_classes, new.score_classes)
    summed["scores"] = _bins_added(t.scores, new.scores, SCORE_BIN_COUNT, postgres=postgres)
    return statement.on_conflict_do_update(index_elements=list(_KEY_COLUMNS), set_=summed)


# What a new row holds in the JSON columns a delta of the database's sums adds nothing to.
_EMPTY: Final = {
    "cloud_errors": "{}",
    "local_latency": "[]",
    "cloud_latency": "[]",
    "confidence": json.dumps([0] * CONFIDENCE_BINS),
}
# The counts a database's sum adds, besides the key, last_end, score_classes and scores.
_SUMMED: Final = tuple(
    c.name
    for c in _STATS.columns
    if c.name not in (*_KEY_COLUMNS, *JSON_COLUMNS, "last_end", "score_classes")
)


def _bins_added(stored: Any, added: Any, bins: int, *, postgres: bool) -> Any:
    """Two JSON arrays of ``bins`` integers added element by element, as a JSON array;
    ``NULL`` if the stored one has another length, which the column refuses: a batch
    adding to such a row fails, as adding two histograms of other layouts does
    (:func:`~fleet_server.hybrid.aggregates.combine`)."""
    if postgres:
        items = [
            cast(stored.op("->>")(literal_column(str(i))), BigInteger)
            + cast(added.op("->>")(literal_column(str(i))), BigInteger)
            for i in range(bins)
        ]
        summed = func.json_build_array(*items)
    else:
        items = [
            func.json_extract(stored, literal_column(f"'$[{i}]'"))
            + func.json_extract(added, literal_column(f"'$[{i}]'"))
            for i in range(bins)
        ]
        summed = func.json_array(*items)
    same = func.json_array_length(stored) == literal_column(str(bins))
    return type_coerce(case((same, summed), else_=null()), JSON)


_SUMMED_UPSERT: Final = {postgres: _summed_upsert(postgres) for postgres in (False, True)}
# Its parameters in the table's column order, run through the driver (rows as tuples).
_SUMMED_COLUMNS: Final = tuple(c.name for c in _STATS.columns if c.name not in _EMPTY)
_SUMMED_ROW: Final = operator.itemgetter(*_SUMMED_COLUMNS)
_BULK_SUMMED_UPSERT: Final = {
    postgres: BulkStatement(statement, _SUMMED_COLUMNS)
    for postgres, statement in _SUMMED_UPSERT.items()
}


def _summed_by_database(d: HybridDelta) -> bool:
    """Whether the database adds ``d`` to its row: it adds to no JSON column but the
    score histogram, and that has the layout's bins (what does not is read and
    refused by :func:`~fleet_server.hybrid.aggregates.combine`, as before)."""
    return len(d.scores) == SCORE_BIN_COUNT and not any(map(d.adds_to, _EMPTY))


def _summed_values(d: HybridDelta) -> dict[str, object]:
    """The parameters of :func:`_summed_upsert` for ``d``."""
    values: dict[str, object] = {name: getattr(d, name) for name in _SUMMED}
    values["device_id"], values["plan_id"], values["hour"] = d.key
    values["last_end"] = d.last_end
    values["score_classes"] = d.score_classes
    values["scores"] = list(d.scores)
    return values


async def add_to_hybrid_stats(session: AsyncSession, deltas: Sequence[HybridDelta]) -> None:
    """Add ``deltas`` to their rows, creating those that do not exist yet.

    The deltas are summed per row first. A row whose sum adds to no JSON column
    but its score histogram (every row of windows without a hybrid section) is
    added to by the database (:func:`_summed_upsert`), not read.
    The others are read, summed here and written: a stored row's JSON columns that
    none of the deltas adds to are neither read nor written. The caller holds the
    row locks of the deltas' devices (ingest's batch writer does), so two replicas
    never add to one row at once; rows are written in key order. The values written
    are those of :func:`~fleet_server.hybrid.aggregates.combine` of the stored row
    and the deltas.
    """
    merged = combine_all(deltas)
    if not merged:
        return
    keys: list[Key] = sorted(merged)
    read = [k for k in keys if not _summed_by_database(merged[k])]
    connection = await session.connection()
    if len(read) < len(keys):
        wanted = set(read)
        await _BULK_SUMMED_UPSERT[on_postgres(session)].execute(
            session, [_SUMMED_ROW(_summed_values(merged[k])) for k in keys if k not in wanted]
        )
    if not read:
        return
    added = [name for name in JSON_COLUMNS if any(merged[k].adds_to(name) for k in read)]
    stored = await _stored(session, read, added)
    new: list[dict[str, object]] = []
    updates: list[dict[str, object]] = []
    for key in read:
        before = stored.get(key)
        if before is None:
            new.append(row_values(merged[key]))
        else:
            values = added_values(before, merged[key], added)
            values["key_device_id"], values["key_plan_id"], values["key_hour"] = key
            updates.append(values)
    if new:
        await connection.execute(_upsert(session), new)
    if updates:
        await connection.execute(_update(added), updates)


async def hybrid_stats(
    session: AsyncSession, since: datetime, device_ids: Collection[str] | None = None
) -> list[HybridDelta]:
    """The rows of hours from ``since`` on (of ``device_ids``, default every device)."""
    query = select(DeviceHybridStats).where(DeviceHybridStats.hour >= since)
    if device_ids is not None:
        query = query.where(DeviceHybridStats.device_id.in_(list(device_ids)))
    return [delta_of(r) for r in (await session.scalars(query)).all()]


_COUNT_COLUMNS = (
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


async def plan_counts(session: AsyncSession, plan_ids: Collection[str]) -> list[HybridDelta]:
    """Every row of the plans ``plan_ids``, counts only (no histograms: what the checks read)."""
    if not plan_ids:
        return []
    table = DeviceHybridStats
    columns = [getattr(table, name) for name in _COUNT_COLUMNS]
    out: list[HybridDelta] = []
    ids = sorted(plan_ids)
    for start in range(0, len(ids), _CHUNK):
        rows = await session.execute(
            select(*columns).where(table.plan_id.in_(ids[start : start + _CHUNK]))
        )
        for row in rows.all():
            values = dict(zip(_COUNT_COLUMNS, row, strict=True))
            errors = values.pop("cloud_errors")
            out.append(
                HybridDelta(
                    **values,
                    cloud_errors={str(k): int(v) for k, v in dict(errors or {}).items()},
                )
            )
    return out


async def active_devices(session: AsyncSession) -> list[Device]:
    """Every device not decommissioned, in id order."""
    query = select(Device).where(Device.decommissioned_at.is_(None)).order_by(Device.id)
    return list((await session.scalars(query)).all())


async def plans(
    session: AsyncSession, device_id: str | None = None, lock: bool = False
) -> list[HybridPlanRow]:
    """The stored plans (of ``device_id``), in device order."""
    query = select(HybridPlanRow).order_by(HybridPlanRow.device_id)
    if device_id is not None:
        query = query.where(HybridPlanRow.device_id == device_id)
    if lock:
        query = query.with_for_update()
    return list((await session.scalars(query)).all())


async def drop_plans(session: AsyncSession, device_ids: Collection[str]) -> None:
    """Delete the plans of ``device_ids``."""
    if device_ids:
        await session.execute(
            delete(HybridPlanRow).where(HybridPlanRow.device_id.in_(list(device_ids)))
        )


async def cloud_settings(session: AsyncSession) -> CloudSettings | None:
    """The operator's capacity setting (``None``: never set)."""
    return await session.get(CloudSettings, 1)
