"""A tick's read of the hourly aggregates whose cost does not grow with the bake.

A row of ``device_hour_stats`` is keyed by the hour its windows ended *and* the
hour it was received in; what arrives for an hour after that hour ended (a
device's backlog, labels) goes to a row of its received hour
(:func:`~fleet_server.rollouts.store.add_to_hour_stats`). So a row whose
received hour ended more than :data:`GRACE` ago (no transaction still writes
it) never changes again. For each range a tick reads (a version's hours from a
start up to now, or up to a fixed end such as the baseline's), a
:class:`KeptAggregates` keeps the per-device sums of those finished rows and
reads at each tick only the rows received since: the hour still open and, once
an hour, the one that just ended, which it adds to what it keeps. Sums add
exactly (:func:`~fleet_server.rollouts.aggregates.add`), so a tick sees the same
aggregates as one that read every row.

The sums live in the process that ticks (one replica at a time holds the tick
lock); a replica that becomes the leader builds them at its first tick, which
reads every row once. Ranges no tick asked for since the previous
:meth:`KeptAggregates.forget_unused` are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.models import as_utc
from fleet_server.rollouts import store
from fleet_server.rollouts.aggregates import DeviceAggregates, add, hour_of

# A received hour counts as finished this long after it ends: longer than any transaction
# that writes hour rows, and than the clocks of two replicas differ.
GRACE = timedelta(minutes=5)

Range = tuple[str, str, datetime]  # model, version, first hour


@dataclass
class _Kept:
    """The sums of the rows of a range received before ``received`` with hours before ``hours``."""

    received: datetime
    hours: datetime
    sums: DeviceAggregates


def _utc_now() -> datetime:
    return datetime.now(UTC)


class KeptAggregates:
    """Per range, the sums of its rows that can no longer change (see the module).

    ``clock``: the server's clock, which received hours are read on (ingest writes on
    it too); the tick's own ``now`` only bounds the hours a range covers.
    """

    def __init__(self, clock: Callable[[], datetime] = _utc_now) -> None:
        self._clock = clock
        self._kept: dict[Range, _Kept] = {}
        self._used: set[Range] = set()

    def __len__(self) -> int:
        return len(self._kept)

    async def read(
        self,
        session: AsyncSession,
        model_name: str,
        model_version: str,
        since: datetime,
        until: datetime,
    ) -> DeviceAggregates:
        """Every device's sums of ``model_name@model_version`` over the hours from the one
        ``since`` falls in up to ``until``: what :func:`store.device_aggregates` reads with
        no device list, reading only the rows received since the previous call."""
        first, until = hour_of(as_utc(since).timestamp()), as_utc(until)
        finished = hour_of((as_utc(self._clock()) - GRACE).timestamp())
        hours = min(finished, until)
        key: Range = (model_name, model_version, first)
        self._used.add(key)
        kept = self._kept.get(key)
        if (
            kept is None
            or kept.received > finished
            or kept.hours > hours
            or (hours > kept.hours and kept.hours != hour_of(kept.hours.timestamp()))
        ):
            # Nothing kept, or a range that ends other than before (two ranges of one start
            # and version, a clock going back, an end within an hour moving): from the start.
            sums = await self._rows(session, key, first, hours, (None, finished))
            kept = self._kept[key] = _Kept(finished, hours, sums)
        elif (kept.received, kept.hours) != (finished, hours):
            later = await self._rows(session, key, first, hours, (kept.received, finished))
            if hours > kept.hours:  # hours now covered that were received before
                later = add(
                    later, await self._rows(session, key, kept.hours, hours, (None, kept.received))
                )
            kept = self._kept[key] = _Kept(finished, hours, add(kept.sums, later))
        fresh = await self._rows(session, key, first, until, (finished, None))
        if hours < until:  # hours past the kept ones, received before ``finished``
            fresh = add(fresh, await self._rows(session, key, hours, until, (None, finished)))
        return add(kept.sums, fresh) if len(fresh) else kept.sums

    async def _rows(
        self,
        session: AsyncSession,
        key: Range,
        since: datetime,
        until: datetime,
        received: tuple[datetime | None, datetime | None],
    ) -> DeviceAggregates:
        return await store.device_aggregates(
            session, key[0], key[1], since, until, received=received
        )

    def forget_unused(self) -> None:
        """Drop the ranges no read asked for since the last call (rollouts ended, moved on)."""
        for key in set(self._kept) - self._used:
            del self._kept[key]
        self._used = set()
