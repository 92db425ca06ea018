"""The drift feature's reads and writes: windows, labels, alerts, release manifests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, false, func, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from fleet_server.db.models import (
    AlertRow,
    Device,
    Release,
    SilenceRow,
    WindowLabels,
    WindowRow,
    as_utc,
)
from fleet_server.drift.lifecycle import Decision
from fleet_server.drift.models import DriftError, Scope
from fleet_server.release.repository import ImageRepository
from protocol.api.drift import AlertQuery
from protocol.api.windows import WindowQuery
from protocol.bundle import BundleFormatError
from protocol.manifest import Manifest

# Window ids per IN (...) when looking up labels.
_ID_CHUNK = 500
_SCOPE_FLAG = {"tag": "tag", "hardware_id": "hardware id", "region": "region"}


class ManifestCache:
    """Bundle manifests of released versions, read once per (name, version) from the repository."""

    def __init__(self, repository: ImageRepository) -> None:
        self.repository = repository
        self._manifests: dict[tuple[str, str], Manifest] = {}

    async def get(self, session: AsyncSession, name: str, version: str) -> Manifest:
        """The manifest of release ``name@version``; :class:`DriftError` if there is none."""
        key = (name, version)
        cached = self._manifests.get(key)
        if cached is not None:
            return cached
        release = (
            await session.scalars(
                select(Release).where(Release.name == name, Release.version == version).limit(1)
            )
        ).first()
        if release is None:
            raise DriftError(f"no release {name}@{version} to take the baseline from")
        try:
            manifest = await asyncio.to_thread(
                self.repository.read_manifest, release.target_path, release.sha256
            )
        except (OSError, BundleFormatError) as exc:
            raise DriftError(f"cannot read the manifest of {name}@{version}: {exc}") from None
        self._manifests[key] = manifest
        return manifest


# -- windows and labels --------------------------------------------------------------


def _ended_in(since: datetime, until: datetime) -> tuple[Any, Any]:
    return WindowRow.end > as_utc(since), WindowRow.end <= as_utc(until)


async def scope_devices(session: AsyncSession, scope: Scope) -> list[str] | None:
    """The device ids of a cohort scope; ``None`` for a device or the fleet (no filter needed)."""
    if scope.kind in ("device", "fleet"):
        return None
    statement = select(Device.id, Device.tags)
    if scope.kind == "hardware_id":
        statement = statement.where(Device.hardware_id == scope.value)
    elif scope.kind == "region":
        statement = statement.where(Device.region == scope.value)
    rows = (await session.execute(statement)).all()
    # Tags are a JSON list: filtered here so SQLite and PostgreSQL behave alike.
    return [r.id for r in rows if scope.kind != "tag" or scope.value in (r.tags or [])]


async def load_windows(
    session: AsyncSession,
    scope: Scope,
    since: datetime,
    until: datetime,
    model_name: str | None = None,
    model_version: str | None = None,
) -> list[WindowRow]:
    """The windows of ``scope`` that ended in ``(since, until]``, oldest first."""
    statement = select(WindowRow).where(*_ended_in(since, until))
    if scope.kind == "device":
        statement = statement.where(WindowRow.device_id == scope.value)
    else:
        devices = await scope_devices(session, scope)
        if devices is not None:
            if not devices:
                return []
            statement = statement.where(WindowRow.device_id.in_(devices))
    if model_name is not None:
        statement = statement.where(WindowRow.model_name == model_name)
    if model_version is not None:
        statement = statement.where(WindowRow.model_version == model_version)
    statement = statement.order_by(WindowRow.end, WindowRow.window_id)
    return list((await session.scalars(statement)).all())


async def labels_of(session: AsyncSession, window_ids: Sequence[str]) -> dict[str, WindowLabels]:
    """The labels posted for any of ``window_ids``, by window id."""
    found: dict[str, WindowLabels] = {}
    for i in range(0, len(window_ids), _ID_CHUNK):
        chunk = window_ids[i : i + _ID_CHUNK]
        for row in await session.scalars(
            select(WindowLabels).where(WindowLabels.window_id.in_(chunk))
        ):
            found[row.window_id] = row
    return found


async def devices_with_windows(
    session: AsyncSession, since: datetime, until: datetime
) -> list[str]:
    """The ids of the devices with windows in ``(since, until]``, sorted."""
    statement = select(WindowRow.device_id).where(*_ended_in(since, until)).distinct()
    return sorted((await session.scalars(statement)).all())


async def versions_with_windows(
    session: AsyncSession, since: datetime, until: datetime
) -> list[tuple[str, str]]:
    """The (model, version) pairs of the windows in ``(since, until]``, sorted."""
    statement = (
        select(WindowRow.model_name, WindowRow.model_version)
        .where(*_ended_in(since, until))
        .distinct()
    )
    return sorted((name, version) for name, version in await session.execute(statement))


async def cohorts_with_windows(
    session: AsyncSession, since: datetime, until: datetime
) -> list[Scope]:
    """Every tag, hardware id and region of a device that has windows in ``(since, until]``."""
    active = select(WindowRow.device_id).where(*_ended_in(since, until)).distinct()
    rows = (
        await session.execute(
            select(Device.tags, Device.hardware_id, Device.region).where(Device.id.in_(active))
        )
    ).all()
    scopes: set[Scope] = set()
    for tags, hardware_id, region in rows:
        scopes.update(Scope("tag", t) for t in tags or [])
        if hardware_id:
            scopes.add(Scope("hardware_id", hardware_id))
        if region:
            scopes.add(Scope("region", region))
    return sorted(scopes, key=lambda sc: (sc.kind, sc.value))


async def unknown_filter(
    session: AsyncSession, scope: Scope, model: str | None, version: str | None
) -> str | None:
    """Why a drift query names something the server does not know, or ``None``.

    A typo must not read as "no windows": a cohort no device belongs to, and a
    model or version neither released nor reported, are refused. A known scope
    that has no windows yet is an empty report, not an error.
    """
    if scope.kind in _SCOPE_FLAG:
        column = {"hardware_id": Device.hardware_id, "region": Device.region}.get(scope.kind)
        found: bool
        if column is not None:
            found = (
                await session.scalar(select(Device.id).where(column == scope.value).limit(1))
                is not None
            )
        else:
            # Tags are a JSON list: looked at here so SQLite and PostgreSQL behave alike.
            tags = (await session.scalars(select(Device.tags))).all()
            found = any(scope.value in (t or []) for t in tags)
        if not found:
            return f"no device has {_SCOPE_FLAG[scope.kind]} {scope.value!r}"
    for value, release_column, window_column, what in (
        (model, Release.name, WindowRow.model_name, "model"),
        (version, Release.version, WindowRow.model_version, "model version"),
    ):
        if value is None:
            continue
        released = select(Release.target_path).where(release_column == value)
        reported = select(WindowRow.window_id).where(window_column == value)
        if model is not None and what == "model version":
            released = released.where(Release.name == model)
            reported = reported.where(WindowRow.model_name == model)
        if (
            await session.scalar(released.limit(1)) is None
            and await session.scalar(reported.limit(1)) is None
        ):
            of = f" of {model}" if model is not None and what == "model version" else ""
            return f"no {what} {value!r}{of} is released or reported"
    return None


async def window_page(
    session: AsyncSession, device_id: str, q: WindowQuery, before: tuple[datetime, str] | None
) -> list[Any]:
    """Up to ``q.limit + 1`` of a device's windows (the extra one says more follow) that
    ``q`` filters, before ``before`` (end, window id), newest first.

    Each row is (window id, start, end, model, version, requests, errors, labelled).
    """
    statement = (
        select(
            WindowRow.window_id,
            WindowRow.start,
            WindowRow.end,
            WindowRow.model_name,
            WindowRow.model_version,
            WindowRow.requests,
            WindowRow.errors,
            WindowLabels.window_id.is_not(None),
        )
        .outerjoin(WindowLabels, WindowLabels.window_id == WindowRow.window_id)
        .where(WindowRow.device_id == device_id)
        .order_by(WindowRow.end.desc(), WindowRow.window_id.desc())
        .limit(q.limit + 1)
    )
    if q.since is not None:
        statement = statement.where(WindowRow.end > as_utc(q.since))
    if q.until is not None:
        statement = statement.where(WindowRow.end <= as_utc(q.until))
    if q.model is not None:
        statement = statement.where(WindowRow.model_name == q.model)
    if q.version is not None:
        statement = statement.where(WindowRow.model_version == q.version)
    if before is not None:
        end, window_id = before
        statement = statement.where(
            or_(WindowRow.end < end, and_(WindowRow.end == end, WindowRow.window_id < window_id))
        )
    return list((await session.execute(statement)).all())


# -- alerts --------------------------------------------------------------------------


async def load_open_alerts(session: AsyncSession) -> dict[str, AlertRow]:
    """Every open alert, by its ``open_key``."""
    rows = await session.scalars(select(AlertRow).where(AlertRow.open_key.is_not(None)))
    return {row.open_key: row for row in rows if row.open_key is not None}


async def open_alerts(session: AsyncSession, **where: str) -> list[AlertRow]:
    """The open alerts whose columns equal ``where``."""
    statement = select(AlertRow).where(AlertRow.state == "open").filter_by(**where)
    return list((await session.scalars(statement)).all())


async def open_alert_counts(session: AsyncSession) -> dict[str, int]:
    """How many alerts are open, by kind."""
    statement = (
        select(AlertRow.kind, func.count()).where(AlertRow.state == "open").group_by(AlertRow.kind)
    )
    return {kind: count for kind, count in await session.execute(statement)}


async def open_alert(
    session: AsyncSession, scope: Scope, decision: Decision, now: datetime
) -> AlertRow | None:
    """The alert ``decision`` opens, or ``None`` when another replica has just opened it."""
    row = AlertRow(
        kind=decision.cause,
        scope=scope.kind,
        scope_value=scope.value,
        model_name=decision.model_name,
        model_version=decision.model_version,
        state="open",
        open_key=decision.key,
        opened_at=now,
        last_seen_at=now,
        evidence=decision.evidence,
    )
    # A savepoint: another replica opening the same alert is not an error.
    try:
        async with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return None
    return row


async def still_open(
    session: AsyncSession, row: AlertRow, key: str, values: dict[str, Any]
) -> bool:
    """Write ``values`` to ``row`` if it is still open under ``key``; whether it was.

    Conditional, so that when two replicas close the same alert only one of
    them does (and notifies), and a replica never writes over a closed one.
    """
    result = await session.execute(
        update(AlertRow)
        .where(AlertRow.id == row.id, AlertRow.open_key == key)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    for name, value in values.items():
        set_committed_value(row, name, value)
    return True


def _alert_filters(q: AlertQuery, silences: Sequence[SilenceRow]) -> list[Any]:
    """The WHERE clauses of an alert query (see :class:`protocol.api.drift.AlertQuery`)."""
    where: list[Any] = []
    if q.state in ("open", "closed"):
        where.append(AlertRow.state == q.state)
    elif q.state == "acknowledged":
        where += [AlertRow.state == "open", AlertRow.acknowledged_at.is_not(None)]
    elif q.state == "silenced":
        where.append(AlertRow.state == "open")
        matchers = [
            and_(
                true(),
                *(
                    column == value
                    for column, value in (
                        (AlertRow.kind, s.kind),
                        (AlertRow.scope, s.scope),
                        (AlertRow.scope_value, s.scope_value),
                        (AlertRow.model_name, s.model_name),
                        (AlertRow.model_version, s.model_version),
                    )
                    if value is not None
                ),
            )
            for s in silences
        ]
        where.append(or_(*matchers) if matchers else false())
    if q.kind is not None:
        where.append(AlertRow.kind == q.kind)
    if q.scope is not None:
        kind, _, value = q.scope.partition(":")
        where.append(AlertRow.scope == kind)
        if value:
            where.append(AlertRow.scope_value == value)
    if q.device is not None:
        where += [AlertRow.scope == "device", AlertRow.scope_value == q.device]
    if q.model is not None:
        where.append(AlertRow.model_name == q.model)
    if q.version is not None:
        where.append(AlertRow.model_version == q.version)
    return where


async def find_alerts(
    session: AsyncSession, q: AlertQuery, silences: Sequence[SilenceRow]
) -> list[AlertRow]:
    """The alerts ``q`` asks for, newest first; ``silences``, the active ones, for ``silenced``."""
    statement = (
        select(AlertRow)
        .where(*_alert_filters(q, silences))
        .order_by(AlertRow.id.desc())
        .limit(q.limit)
    )
    return list((await session.scalars(statement)).all())
