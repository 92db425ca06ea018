"""Withdrawing assignments: a yanked release, a decommissioned device.

Both withdraw assignments: the database records, in one transaction with the
audit entry, that the devices concerned are assigned nothing (at their next
director version); once that has committed, their director metadata is signed
empty, so each device keeps what it runs (:func:`withdraw_assignments`, signed
by :meth:`~fleet_server.assignments.service.AssignmentService.sync`, which
also signs what a crash left unsigned).

A **yank** (:func:`yank`): no device that does not run the release already is
offered it again; the devices that run it keep it until assigned another
release. A yank is not a rollback. The image repository still lists the
release: its targets metadata is signed by the release engineer's offline
keys, which the server does not hold; devices install only what the director
names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.assignments import store
from fleet_server.assignments.models import ReleaseAlreadyYanked, YankOutcome
from fleet_server.assignments.planner import rule_label
from fleet_server.assignments.service import AssignmentService
from fleet_server.audit import record
from fleet_server.db import Database
from fleet_server.db.models import Release
from fleet_server.published.rules import ReleaseNotFound
from protocol.messages import DesiredState

log = logging.getLogger(__name__)


async def withdraw_assignments(
    assignments: AssignmentService,
    session: AsyncSession,
    device_ids: Sequence[str],
    actor: str,
) -> dict[str, int]:
    """Withdraw the devices' assignments in the caller's transaction; their new versions.

    Each device is assigned nothing at its next director version (above both
    the recorded and the signed one), so once the transaction has committed
    :meth:`AssignmentService.sync` signs an empty assignment for it: the device
    keeps what it runs. Its current assignment is marked cancelled by ``actor``
    (``assignments list --cancelled`` shows it), and a shadow install beside it
    is dropped. Devices already assigned nothing are left alone.
    """
    ids = sorted(set(device_ids))
    if not ids:
        return {}
    devices = [
        d
        for d in await store.lock_devices(session, ids)
        if d.assigned_target is not None or d.shadow_target is not None
    ]
    signed = await asyncio.to_thread(
        lambda: {d.id: assignments.director.signed(d.id).version for d in devices}
    )
    versions = {}
    now = datetime.now(UTC)
    for device in devices:
        version = max(device.director_version or 0, signed[device.id]) + 1
        device.assigned_target = None
        device.shadow_target = device.shadow_rollout = None
        device.director_version = version
        versions[device.id] = version
        current = await store.current_assignment(session, device.id)
        if current is not None and current.cancelled_at is None:
            store.cancel(current, now, actor)
    return versions


async def cancel_rules_of(session: AsyncSession, target_path: str, actor: str) -> list[str]:
    """Cancel, in the caller's transaction, the active tag rules that assign ``target_path``."""
    rules = await store.lock_rules_of(session, target_path)
    now = datetime.now(UTC)
    for rule in rules:
        store.cancel(rule, now, actor)
    return [rule_label(rule.id) for rule in rules]


async def announce_withdrawn(assignments: AssignmentService, versions: dict[str, int]) -> None:
    """Publish, retained, that each device is assigned nothing now (after commit)."""
    if assignments.publish is None:
        return
    for device_id, version in sorted(versions.items()):
        await assignments.publish(
            DesiredState(
                device_id=device_id, director_version=version, bundle=None, issued_at=time.time()
            )
        )


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
        assigned = await store.lock_assigned(session, target_path)
        # What a device reports running, as ingest stores it ("NAME VERSION").
        running = f"{release.name} {release.version}"
        kept = [d.id for d in assigned if d.active_bundle == running]
        versions = await withdraw_assignments(
            assignments, session, [d.id for d in assigned if d.active_bundle != running], actor
        )
        withdrawn = sorted(versions)
        # A tag rule naming it would give it to devices that gain the tag later.
        rules = await cancel_rules_of(session, target_path, actor)
        shadows = await drop_shadows_of(assignments, session, target_path)
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
                "shadows_dropped": shadows,
            },
        )
    await sign_withdrawn(db, assignments, versions)
    if shadows:
        try:
            await assignments.sync(db, shadows)
            await assignments.announce_changed(db, shadows)
        except Exception:
            log.exception("dropped shadows of %s committed but not signed", shadows)
    return YankOutcome(release, withdrawn, kept, rules)


async def drop_shadows_of(
    assignments: AssignmentService, session: AsyncSession, target_path: str
) -> list[str]:
    """Drop, in the caller's transaction, every shadow install of ``target_path``; the devices
    keep their assignments. Returns them (each at its next director version)."""
    devices = await store.lock_shadowing(session, target_path)
    signed = await asyncio.to_thread(
        lambda: {d.id: assignments.director.signed(d.id).version for d in devices}
    )
    for device in devices:
        device.shadow_target = device.shadow_rollout = None
        device.director_version = max(device.director_version or 0, signed[device.id]) + 1
    return [d.id for d in devices]


async def sign_withdrawn(
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
