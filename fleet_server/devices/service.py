"""The devices feature's service: each operation in one transaction, then what follows it.

Work that must follow the commit (creating a device's director repository,
signing and announcing what a tag rule assigned it, signing a withdrawn
assignment empty) runs after it, and its failure is logged without undoing
what was committed: the device finds its assignment at its next poll either
way.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.assignments.listing import refusals_of_device
from fleet_server.assignments.models import AssignmentResult, Refusal
from fleet_server.assignments.service import AssignmentService
from fleet_server.assignments.withdrawal import sign_withdrawn, withdraw_assignments
from fleet_server.db import Database
from fleet_server.db.models import Device, ProvisioningToken, Release
from fleet_server.devices import store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shown:
    """A device with its latest refusals, and a warning if it refused its assignment."""

    device: Device
    refusals: list[Refusal]
    warning: str | None


async def list_devices(
    db: Database,
    *,
    tag: str | None = None,
    hardware_id: str | None = None,
    online: bool | None = None,
    include_decommissioned: bool = False,
) -> list[Device]:
    """Devices by id (see :func:`fleet_server.devices.store.list_devices`)."""
    async with db.session() as session:
        return await store.list_devices(
            session,
            tag=tag,
            hardware_id=hardware_id,
            online=online,
            include_decommissioned=include_decommissioned,
        )


async def show_device(db: Database, device_id: str) -> Shown:
    """The device, with what it refused lately."""
    async with db.session() as session:
        device = await store.get_device(session, device_id)
        refusals, warning = await refusals_of_device(session, device)
    return Shown(device, refusals, warning)


async def register_device(
    db: Database,
    assignments: AssignmentService,
    *,
    device_id: str,
    hardware_id: str,
    region: str | None,
    timezone: str | None,
    tags: Sequence[str],
    actor: str,
    reuse_decommissioned: bool,
) -> tuple[Device, str]:
    """Pre-register a device (an admin); returns it and its password, shown only once."""
    async with db.session() as session:
        device, password = await store.create_device(
            session,
            device_id=device_id,
            hardware_id=hardware_id,
            region=region,
            timezone=timezone,
            tags=tags,
            actor=actor,
            reuse_decommissioned=reuse_decommissioned,
        )
        ruled = await _apply_tag_rules(assignments, session, device, device.tags, actor)
    await _after_enrolment(assignments, device.id)
    await _sign_ruled(db, assignments, ruled)
    return device, password


async def enrol_device(
    db: Database,
    assignments: AssignmentService,
    *,
    token: str,
    device_id: str,
    hardware_id: str,
    region: str | None,
    timezone: str | None,
    tags: Sequence[str],
) -> tuple[Device, str]:
    """A device enrols itself with a provisioning token; returns it and its password."""
    async with db.session() as session:
        device, password = await store.enrol(
            session,
            token=token,
            device_id=device_id,
            hardware_id=hardware_id,
            region=region,
            timezone=timezone,
            tags=tags,
        )
        ruled = await _apply_tag_rules(
            assignments, session, device, device.tags, f"device:{device.id}"
        )
    await _after_enrolment(assignments, device.id)
    await _sign_ruled(db, assignments, ruled)
    return device, password


async def tag_device(
    db: Database,
    assignments: AssignmentService,
    device_id: str,
    *,
    add: Sequence[str],
    remove: Sequence[str],
    actor: str,
) -> Device:
    """Add and remove a device's tags; the rules of the tags it gained apply to it."""
    async with db.session() as session:
        before = set((await store.get_device(session, device_id)).tags)
        device = await store.set_tags(session, device_id, add=add, remove=remove, actor=actor)
        gained = set(device.tags) - before
        ruled = await _apply_tag_rules(assignments, session, device, gained, actor)
    await _sign_ruled(db, assignments, ruled)
    return device


async def device_events(db: Database, device_id: str, limit: int) -> list[Any]:
    """The device's events, newest first (see :func:`fleet_server.devices.store.recent_events`)."""
    async with db.session() as session:
        device = await store.get_device(session, device_id)
        return await store.recent_events(session, device.id, limit)


async def create_provisioning_token(
    db: Database,
    *,
    actor: str,
    hardware_id: str | None,
    tags: Sequence[str],
    uses: int,
    ttl: timedelta,
) -> tuple[str, ProvisioningToken]:
    """A provisioning token (``ID.SECRET``, shown only once) and what it allows."""
    async with db.session() as session:
        token = await store.create_provisioning_token(
            session, actor=actor, hardware_id=hardware_id, tags=tags, uses=uses, ttl=ttl
        )
        row = await session.get(ProvisioningToken, token.partition(".")[0])
        assert row is not None  # created just above, in this transaction
    return token, row


async def decommission(
    db: Database, assignments: AssignmentService, device_id: str, *, reason: str | None, actor: str
) -> Device:
    """Decommission ``device_id`` and withdraw its assignment; returns the device.

    Its credential is removed, so its HTTP requests are refused (401) and its
    MQTT messages dropped (``decommissioned-device``); its row and history stay.
    """
    async with db.session() as session:
        device = await store.decommission_device(session, device_id, reason=reason, actor=actor)
        versions = await withdraw_assignments(assignments, session, [device_id], actor)
    await sign_withdrawn(db, assignments, versions)
    return device


async def rotate_credentials(db: Database, device_id: str, *, actor: str) -> tuple[Device, str]:
    """A new password for the device (shown only once); the old one stops working at once."""
    async with db.session() as session:
        return await store.rotate_credentials(session, device_id, actor=actor)


async def _after_enrolment(assignments: AssignmentService, device_id: str) -> None:
    try:
        await assignments.register(device_id)
    except Exception:
        # The first assignment creates the repository anyway; the credentials must not be lost.
        log.exception("could not create the director repository of %s", device_id)


async def _apply_tag_rules(
    assignments: AssignmentService,
    session: AsyncSession,
    device: Device,
    gained: Collection[str],
    actor: str,
) -> tuple[Release, AssignmentResult] | None:
    """In the caller's transaction: what the tag rules assign to a device that gained tags."""
    result = await assignments.apply_rules(session, device, gained, actor)
    if result is None:
        return None
    release = await session.get(Release, result.target_path)
    assert release is not None  # the assignment was just recorded against it
    return release, result


async def _sign_ruled(
    db: Database,
    assignments: AssignmentService,
    ruled: tuple[Release, AssignmentResult] | None,
) -> None:
    """After the commit: sign and announce what a tag rule assigned (failures are retried)."""
    if ruled is None:
        return
    release, result = ruled
    try:
        await assignments.sync(db, [result.device_id])
        # A device registered just now had no director metadata when the version was chosen:
        # the sync signed above the empty one its registration made, and recorded that.
        async with db.session() as session:
            version = await store.director_version(session, result.device_id)
        await assignments.announce(
            release, [replace(result, director_version=version or result.director_version)]
        )
    except Exception:
        log.exception("tag rule assignment of %s committed but not signed", result.device_id)
