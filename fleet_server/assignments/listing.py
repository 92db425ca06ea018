"""What operators are shown of assignments: the current ones and rules, a device's refusals.

Reads only; each in its own transaction or the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.assignments import store
from fleet_server.assignments.models import Refusal
from fleet_server.assignments.planner import refusal_of, refusal_warning
from fleet_server.db import Database
from fleet_server.db.models import Assignment, AssignmentRule, Device, Release
from fleet_server.devices.errors import DeviceNotFound
from fleet_server.devices.store import list_devices
from fleet_server.published.service import find_release as find_published


async def refusals_of_device(
    session: AsyncSession, device: Device
) -> tuple[list[Refusal], str | None]:
    """The device's latest refusals, and a warning if it refused its current assignment."""
    refusals = await store.recent_refusals(session, device.id)
    warning = None
    if device.assigned_target is not None and refusals:
        release = await session.get(Release, device.assigned_target)
        current = await store.current_assignment(session, device.id)
        if release is not None and current is not None and current.cancelled_at is None:
            refused = refusal_of(refusals, release, current.assigned_at)
            if refused is not None:
                warning = refusal_warning(device.id, release, refused)
    return refusals, warning


@dataclass(frozen=True)
class Listing:
    """Current assignments and tag rules, with what a listing shows beside them."""

    assignments: list[Assignment]
    rules: list[AssignmentRule]
    releases: dict[str, Release]
    tags_of: dict[str, set[str]]
    holding: dict[int, int]  # devices each rule's assignment is current on


async def list_current(db: Database, *, device: str | None, cancelled: bool) -> Listing:
    """Each device's latest assignment and the tag rules; the cancelled ones only if asked.

    A device's latest assignment counts only while the device is assigned it
    (a withdrawn one is shown with ``cancelled``).
    """
    async with db.session() as session:
        releases = await store.releases_by_path(session)
        devices = {d.id: d for d in await list_devices(session)}
        if device is not None and device not in devices:
            raise DeviceNotFound(f"no device {device}")
        rows = [
            a
            for a in await store.current_assignments(session)
            if (cancelled or (a.cancelled_at is None and devices[a.device_id].assigned_target))
        ]
        rules = await store.rules(session, cancelled=cancelled)
    holding: dict[int, int] = {}
    for a in rows:
        if a.rule_id is not None and a.cancelled_at is None:
            holding[a.rule_id] = holding.get(a.rule_id, 0) + 1
    tags_of = {d.id: set(d.tags or []) for d in devices.values()}
    return Listing(rows, rules, releases, tags_of, holding)


async def find_release(db: Database, release: str) -> Release:
    """A release by ``NAME@VERSION`` or by target path (:class:`ReleaseNotFound` if none)."""
    async with db.session() as session:
        return await find_published(session, release)
