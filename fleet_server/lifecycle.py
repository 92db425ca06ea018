"""Device and release lifecycle: decommissioning a device, yanking a release.

Both withdraw assignments: the database records, in one transaction with the
audit entry, that the devices concerned are assigned nothing (at their next
director version); once that has committed, their director metadata is signed
empty, so each device keeps what it runs (:func:`fleet_server.assignments.withdraw_assignments`,
signed by :meth:`~fleet_server.assignments.AssignmentService.sync`, which also
signs what a crash left unsigned).

- **Decommission** (:func:`decommission`): the device's credential is
  removed, so its HTTP requests are refused (401) and its MQTT messages
  dropped (``decommissioned-device``); its row and history stay.
- **Yank** (:func:`yank`): no device that does not run the release already
  is offered it again; the devices that run it keep it until assigned another
  release. A yank is not a rollback. The image repository still lists the
  release: its targets metadata is signed by the release engineer's offline
  keys, which the server does not hold; devices install only what the
  director names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from fleet_server import registry
from fleet_server.assignments import (
    AssignmentService,
    announce_withdrawn,
    cancel_rules_of,
    withdraw_assignments,
)
from fleet_server.audit import record
from fleet_server.db import Database
from fleet_server.db.models import Device, Release
from fleet_server.published import ReleaseError

log = logging.getLogger(__name__)


class ReleaseNotFound(ReleaseError):
    status = 404


class ReleaseAlreadyYanked(ReleaseError):
    status = 409


@dataclass(frozen=True)
class YankOutcome:
    """A yanked release, the devices whose assignment of it was withdrawn, those running it."""

    release: Release
    withdrawn: list[str]
    kept: list[str]
    rules_cancelled: list[str]


async def decommission(
    db: Database, assignments: AssignmentService, device_id: str, *, reason: str | None, actor: str
) -> Device:
    """Decommission ``device_id`` and withdraw its assignment; returns the device."""
    async with db.session() as session:
        device = await registry.decommission_device(session, device_id, reason=reason, actor=actor)
        versions = await withdraw_assignments(assignments, session, [device_id], actor)
    await _sign_withdrawn(db, assignments, versions)
    return device


async def yank(
    db: Database, assignments: AssignmentService, target_path: str, *, reason: str, actor: str
) -> YankOutcome:
    """Yank the release at ``target_path``: withdraw it from every device not running it."""
    async with db.session() as session:
        release = await session.get(Release, target_path, with_for_update=True)
        if release is None:
            raise ReleaseNotFound(f"no release {target_path}")
        if release.yanked_at is not None:
            at = release.yanked_at
            raise ReleaseAlreadyYanked(
                f"{release.name} {release.version} was yanked already on "
                f"{at:%Y-%m-%d %H:%M} UTC: {release.yank_reason}"
            )
        release.yanked_at = datetime.now(UTC)
        release.yank_reason = reason
        assigned = (
            await session.scalars(
                select(Device)
                .where(Device.assigned_target == target_path)
                .order_by(Device.id)
                .with_for_update()
            )
        ).all()
        # What a device reports running, as ingest stores it ("NAME VERSION").
        running = f"{release.name} {release.version}"
        kept = [d.id for d in assigned if d.active_bundle == running]
        versions = await withdraw_assignments(
            assignments, session, [d.id for d in assigned if d.active_bundle != running], actor
        )
        withdrawn = sorted(versions)
        # A tag rule naming it would give it to devices that gain the tag later.
        rules = await cancel_rules_of(session, target_path, actor)
        await record(
            session,
            actor,
            "release.yank",
            target_path,
            {
                "name": release.name,
                "version": release.version,
                "reason": reason,
                "withdrawn": withdrawn,
                "kept": kept,
                "rules_cancelled": rules,
            },
        )
    await _sign_withdrawn(db, assignments, versions)
    return YankOutcome(release, withdrawn, kept, rules)


async def _sign_withdrawn(
    db: Database, assignments: AssignmentService, versions: dict[str, int]
) -> None:
    """After the commit: sign the empty assignments and say so over MQTT.

    A failure is logged, not raised: what is committed stands, and the
    director sync signs it later.
    """
    if not versions:
        return
    try:
        await assignments.sync(db, sorted(versions))
    except Exception:
        log.exception("withdrawn assignments of %s committed but not signed", sorted(versions))
    try:
        await announce_withdrawn(assignments, versions)
    except Exception:
        log.exception("withdrawn assignments of %s committed but not announced", sorted(versions))
