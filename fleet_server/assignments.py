"""Assignments: which released bundle each device runs; recorded, signed, announced.

An assignment names devices, or a tag: a tag assignment is a rule
(``assignment_rules``) that also gives its release to every device that gains
the tag later (:meth:`AssignmentService.apply_rules`). Precedence for a device
gaining a tag: an assignment made for the device by name overrides tag rules,
and of two rules matching it, the newest wins. A release below the counter a
device reports running is refused up front (the device would refuse it); an
old model goes back out as a re-release above the counter. Cancelling
(:meth:`AssignmentService.cancel`) signs metadata that names nothing, so the
device keeps what it runs.

An assignment is recorded in the database and the audit log first; once that
transaction has committed, the committed state is signed into each device's
director metadata (which is what the device trusts) and announced with a
retained MQTT desired-state message, so an online device acts at once and an
offline one on reconnect.

The database is the record and the director metadata follows it, never the
other way round: a device can only ever see an assignment that is committed.
The transaction chooses each device's next director version (above both the
recorded and the signed one) and signing happens after the commit, so a
commit that fails leaves the metadata as it was. What was committed but not
signed (the process died in between, the disk was full) is signed by
:meth:`AssignmentService.sync`, which the server runs at start and hourly: the
outbox is the device table itself, compared with what each device's metadata
names (:func:`plan_sync`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit import record
from fleet_server.db import Database
from fleet_server.db.models import Assignment, AssignmentRule, Device, DeviceEventRow, Release
from fleet_server.director import DirectorRepository, Signed
from fleet_server.published.rules import released_bundle
from fleet_server.registry import (
    DeviceNotFound,
    RegistryError,
    list_devices,
    refuse_decommissioned,
)
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ReleasedBundle, RepositoryError
from protocol.api import ASSIGNMENT_ID_PATTERN
from protocol.messages import BundleRef, DesiredState

log = logging.getLogger(__name__)

PublishDesired = Callable[[DesiredState], Awaitable[None]]


class AssignmentError(RegistryError):
    """The assignment cannot be made; the message says why."""


class ReleaseYanked(AssignmentError):
    """The release was yanked: it is assigned to no device any more."""

    status = 409


class AssignmentConflict(AssignmentError):
    """The assignment contradicts what a device runs, or what was cancelled already."""

    status = 409


class AssignmentNotFound(AssignmentError):
    status = 404


@dataclass(frozen=True)
class AssignmentResult:
    device_id: str
    target_path: str
    director_version: int


@dataclass(frozen=True)
class Assigned:
    """What :meth:`AssignmentService.assign` recorded: each device's assignment, and the rule."""

    results: list[AssignmentResult]
    rule_id: int | None


@dataclass(frozen=True)
class Cancelled:
    """What :meth:`AssignmentService.cancel` cancelled: the devices that now keep what they run."""

    assignment_id: str
    target_path: str
    devices: list[str]
    versions: dict[str, int]  # each device's director version that names nothing


# Assignments are named by kind: ``dev-N`` one device's (a row of ``assignments``),
# ``tag-N`` a tag rule (a row of ``assignment_rules``).
_ASSIGNMENT_ID = re.compile(ASSIGNMENT_ID_PATTERN)
# Devices named in a one-line refusal; the rest are counted.
NAMED_IN_REFUSAL = 3


def device_label(assignment_id: int) -> str:
    return f"dev-{assignment_id}"


def rule_label(rule_id: int) -> str:
    return f"tag-{rule_id}"


def parse_assignment_id(text: str) -> tuple[str, int]:
    """``dev-N`` or ``tag-N`` as (kind, N); anything else is refused naming the form."""
    if not _ASSIGNMENT_ID.match(text):
        raise AssignmentError(
            f"assignment id {text!r} must be dev-N (a device's) or tag-N (a tag rule's), "
            "as fleetctl assignments list shows"
        )
    kind, _, number = text.partition("-")
    return kind, int(number)


def below_installed(release: Release, devices: Sequence[Device]) -> list[Device]:
    """The devices running a higher release counter than ``release``: they would refuse it."""
    return [d for d in devices if (d.installed_counter or 0) > release.release_counter]


def counter_refusal(release: Release, below: Sequence[Device], total: int, tag: str | None) -> str:
    """One line: which devices run a higher counter than ``release``, and how to roll back."""
    named = "; ".join(
        f"{d.id} runs {d.active_bundle or 'a bundle'} (release counter {d.installed_counter})"
        for d in below[:NAMED_IN_REFUSAL]
    )
    more = f"; and {len(below) - NAMED_IN_REFUSAL} more" if len(below) > NAMED_IN_REFUSAL else ""
    if tag is not None:
        whom = f"{len(below)} of the {total} devices it matches (tag {tag}) run"
    elif len(below) == 1:
        whom = "the device runs"
    else:
        whom = f"{len(below)} of the {total} devices run"
    return (
        f"{release.name} {release.version} (release counter {release.release_counter}) is below "
        f"what {whom}: {named}{more}; a device never installs a lower release counter, so "
        f"re-release it above: fleetctl release add --re-release-of "
        f"{release.name}@{release.version} --repo REPO --keys KEYS, then fleetctl release push "
        "--repo REPO, and assign the version that prints"
    )


def winning_rule(rules: Iterable[AssignmentRule], tags: Iterable[str]) -> AssignmentRule | None:
    """The newest active rule whose tag is among ``tags`` (of two rules, the later one wins)."""
    held = set(tags)
    matching = [r for r in rules if r.cancelled_at is None and r.tag in held]
    return max(matching, key=lambda r: r.id, default=None)


async def current_assignment(session: AsyncSession, device_id: str) -> Assignment | None:
    """The device's latest assignment (cancelled or not), or ``None``."""
    return (
        await session.scalars(
            select(Assignment)
            .where(Assignment.device_id == device_id)
            .order_by(Assignment.id.desc())
            .limit(1)
        )
    ).first()


async def current_assignments(session: AsyncSession) -> list[Assignment]:
    """Every device's latest assignment (cancelled or not), by device id."""
    latest = (
        select(Assignment.device_id, func.max(Assignment.id).label("id"))
        .group_by(Assignment.device_id)
        .subquery()
    )
    return list(
        (
            await session.scalars(
                select(Assignment)
                .join(latest, Assignment.id == latest.c.id)
                .order_by(Assignment.device_id)
            )
        ).all()
    )


# The agent's events that say it refused an update, or rolled it back and will not
# retry it (see agent.ota.installer).
REFUSAL_EVENTS = ("check-refused", "assignment-refused", "refused", "rolled-back")


@dataclass(frozen=True)
class Refusal:
    """An update a device refused, as its event says."""

    at: datetime
    received_at: datetime
    event: str
    reason: str | None
    bundle: str | None
    message: str | None


def _text(details: dict[str, Any], key: str) -> str | None:
    value = details.get(key)
    return value[:500] if isinstance(value, str) else None


async def recent_refusals(session: AsyncSession, device_id: str, limit: int = 5) -> list[Refusal]:
    """The device's latest refusal events, newest first."""
    rows = await session.scalars(
        select(DeviceEventRow)
        .where(DeviceEventRow.device_id == device_id, DeviceEventRow.event.in_(REFUSAL_EVENTS))
        .order_by(DeviceEventRow.id.desc())
        .limit(limit)
    )
    refusals = []
    for row in rows:
        details = row.details if isinstance(row.details, dict) else {}
        refusals.append(
            Refusal(
                at=row.at,
                received_at=row.received_at,
                event=row.event,
                reason=_text(details, "reason"),
                # A refused install names its bundle; a given-up download the one abandoned.
                bundle=_text(details, "bundle") or _text(details, "abandoned"),
                message=_text(details, "message"),
            )
        )
    return refusals


def refusal_of(refusals: Sequence[Refusal], release: Release, since: datetime) -> Refusal | None:
    """The newest refusal of ``release`` received since ``since`` (its assignment), if any.

    A refusal names the bundle as NAME VERSION: in its ``bundle`` field, or (a
    refused director answer) in its message.
    """
    label = f"{release.name} {release.version}"
    named = re.compile(rf"(^|[\s(]){re.escape(label)}($|[\s:;,)])")
    for r in refusals:
        if r.received_at < since:
            continue
        if r.bundle == label or (r.bundle is None and r.message and named.search(r.message)):
            return r
    return None


def refusal_warning(device_id: str, release: Release, refusal: Refusal) -> str:
    """One line: the device refused (or rolled back) the bundle assigned to it."""
    did = "rolled back" if refusal.event == "rolled-back" else "refused"
    return (
        f"{device_id} {did} the assigned {release.name} {release.version} at "
        f"{refusal.at:%Y-%m-%d %H:%M:%S}Z ({refusal.reason or refusal.event}: "
        f"{refusal.message or 'no message'}); it keeps running what it has"
    )


@dataclass(frozen=True)
class Committed:
    """A device's assignment as the database holds it."""

    device_id: str
    target_path: str | None
    director_version: int


@dataclass(frozen=True)
class SyncStep:
    """What brings one device's director metadata in line with the database.

    ``sign``: sign the committed target at ``version`` (else nothing to sign);
    ``record``: the database's director version becomes ``version``.
    """

    sign: bool
    version: int
    record: bool


def plan_sync(committed: Committed, signed: Signed) -> SyncStep | None:
    """The step that makes ``signed`` name what ``committed`` says, or ``None`` if it does.

    - committed but not signed yet (metadata older than the recorded version):
      sign it at the recorded version;
    - the metadata names another target at the recorded version or later (it
      got ahead of the database, as before signing followed the commit):
      sign the committed target at the next version and record that version;
    - the same target, the metadata at a later version: record its version;
    - an assignment withdrawn (by a cancel, a yank or a decommission: nothing
      committed at a recorded version) while the metadata still names a target:
      sign an empty assignment, so the device keeps what it runs. A device never
      assigned (recorded version 0) needs nothing, whatever its metadata says.
    """
    if committed.target_path is None:
        if committed.director_version == 0 or signed.target_path is None:
            return None  # never assigned, or withdrawn and signed: it keeps what it runs
        if signed.version < committed.director_version:
            return SyncStep(sign=True, version=committed.director_version, record=False)
        return SyncStep(sign=True, version=signed.version + 1, record=True)
    if signed.version < committed.director_version:
        return SyncStep(sign=True, version=committed.director_version, record=False)
    if signed.target_path != committed.target_path:
        return SyncStep(sign=True, version=signed.version + 1, record=True)
    if signed.version != committed.director_version:
        return SyncStep(sign=False, version=signed.version, record=True)
    return None


class AssignmentService:
    """Assigns releases to devices, signs the assignments with the director's online key."""

    def __init__(
        self, director: DirectorRepository, keys: KeyStore, publish: PublishDesired | None = None
    ) -> None:
        self.director = director
        self.keys = keys
        self.publish = publish
        # Devices whose committed assignment could not be signed: retried soon, not hourly.
        self.unsigned: set[str] = set()

    async def register(self, device_id: str) -> None:
        """Create the device's empty director repository (it can ask before any assignment)."""
        await asyncio.to_thread(self.director.register, self.keys, device_id)

    async def assign(
        self,
        db: Database,
        *,
        target_path: str,
        actor: str,
        device_ids: Sequence[str] = (),
        tag: str | None = None,
    ) -> Assigned:
        """Assign the release at ``target_path`` to the devices named, and as a rule to ``tag``.

        A tag assignment is a rule (:class:`AssignmentRule`): every device that
        has the tag now gets the release, and so does every device that gains
        it later (:meth:`apply_rules`). A release below the release counter a
        device runs is refused (:class:`AssignmentConflict`): the device would
        refuse it. Records the assignment (commits), then signs what was
        committed. A signing failure after the commit is logged, not raised:
        the assignment stands and :meth:`sync` signs it later.
        """
        async with db.session() as session:
            # Locked: a yank committed meanwhile is seen here, not overtaken.
            release = await session.get(Release, target_path, with_for_update=True)
            if release is None:
                raise AssignmentError(f"no release {target_path}; push it first")
            refuse_yanked(release)
            devices: list[Device] = []
            for device_id in device_ids:
                device = await session.get(Device, device_id)
                if device is None:
                    raise DeviceNotFound(f"no device {device_id}")
                refuse_decommissioned(device, "be assigned a release")
                devices.append(device)
            named = {d.id for d in devices}
            if tag is not None:
                devices += [d for d in await list_devices(session, tag=tag) if d.id not in named]
            if not devices:
                # A typo in a tag must not become a rule that waits for devices forever.
                raise AssignmentError(
                    "no device matches the assignment"
                    + (f" (no device has the tag {tag}; tag one first)" if tag else "")
                )
            wrong = [d.id for d in devices if d.hardware_id not in release.hardware_ids]
            if wrong:
                raise AssignmentError(
                    f"{release.name} {release.version} is not released for the hardware of "
                    f"{', '.join(wrong)}"
                )
            below = below_installed(release, devices)
            if below:
                raise AssignmentConflict(counter_refusal(release, below, len(devices), tag))
            rule: AssignmentRule | None = None
            if tag is not None:
                rule = AssignmentRule(
                    tag=tag, target_path=target_path, created_at=datetime.now(UTC), actor=actor
                )
                session.add(rule)
                await session.flush()
            results = await self._record(
                session,
                release,
                [(d, None if d.id in named or rule is None else rule.id) for d in devices],
                actor,
            )
            await record(
                session,
                actor,
                "assignment.create",
                target_path,
                {
                    "devices": [r.device_id for r in results],
                    "tag": tag,
                    "rule": rule_label(rule.id) if rule is not None else None,
                    "version": release.version,
                    "release_counter": release.release_counter,
                },
            )
            rule_id = rule.id if rule is not None else None
        # Committed: now, and only now, the devices may see it.
        await self.sync(db, [r.device_id for r in results])
        return Assigned(results, rule_id)

    async def _record(
        self,
        session: AsyncSession,
        release: Release,
        devices: Sequence[tuple[Device, int | None]],
        actor: str,
    ) -> list[AssignmentResult]:
        """Record ``release`` as the assignment of each device (with the rule it came from)."""
        ids = sorted(d.id for d, _ in devices)
        # Locked in id order, and read again under the lock: two assignments of one
        # device at once get different versions, not the same one twice.
        locked = await session.execute(
            select(Device.id, Device.director_version)
            .where(Device.id.in_(ids))
            .order_by(Device.id)
            .with_for_update()
        )
        recorded = {device_id: version for device_id, version in locked}
        signed = await asyncio.to_thread(lambda: {d: self.director.signed(d).version for d in ids})
        results = []
        now = datetime.now(UTC)
        for device, rule_id in devices:
            version = max(recorded[device.id] or 0, signed[device.id]) + 1
            device.assigned_target = release.target_path
            device.director_version = version
            session.add(
                Assignment(
                    device_id=device.id,
                    target_path=release.target_path,
                    director_version=version,
                    assigned_at=now,
                    actor=actor,
                    rule_id=rule_id,
                )
            )
            results.append(AssignmentResult(device.id, release.target_path, version))
        await session.flush()
        return results

    async def apply_rules(
        self, session: AsyncSession, device: Device, gained: Collection[str], actor: str
    ) -> AssignmentResult | None:
        """Give ``device``, which just gained the tags ``gained``, what its tag rules assign.

        In the caller's transaction (the caller signs after its commit with
        :meth:`sync`). The newest active rule among all the device's tags wins,
        and only if one of the gained tags has a rule; a device whose current
        assignment was made for it by name keeps it (a device-specific
        assignment overrides tag rules). A rule whose release the device cannot
        take (another hardware, or below the release counter it runs) is not
        applied, and the audit log says why.
        """
        tags = set(device.tags or [])
        if not set(gained) & tags:
            return None
        rules = (
            await session.scalars(
                select(AssignmentRule).where(
                    AssignmentRule.tag.in_(sorted(tags)), AssignmentRule.cancelled_at.is_(None)
                )
            )
        ).all()
        rule = winning_rule(rules, tags)
        if rule is None or not any(r.tag in gained for r in rules):
            return None
        current = await current_assignment(session, device.id)
        if (
            current is not None
            and current.cancelled_at is None
            and device.assigned_target
            and current.rule_id in (None, rule.id)
        ):
            return None  # assigned by name (overrides rules), or by this rule already
        release = await session.get(Release, rule.target_path)
        assert release is not None  # a rule's release is a foreign key
        details = {
            "device": device.id,
            "rule": rule_label(rule.id),
            "tag": rule.tag,
            "version": release.version,
            "release_counter": release.release_counter,
        }
        why_not = None
        if release.yanked_at is not None:
            why_not = f"{release.name} {release.version} was yanked: {release.yank_reason}"
        elif device.hardware_id not in release.hardware_ids:
            why_not = f"{release.name} {release.version} is not released for {device.hardware_id}"
        elif below_installed(release, [device]):
            why_not = counter_refusal(release, [device], 1, None)
        if why_not is not None:
            await record(
                session,
                actor,
                "assignment.rule-skip",
                rule.target_path,
                {**details, "why": why_not},
            )
            log.warning("rule %s not applied to %s: %s", rule_label(rule.id), device.id, why_not)
            return None
        [result] = await self._record(session, release, [(device, rule.id)], actor)
        await record(
            session,
            actor,
            "assignment.apply",
            rule.target_path,
            {**details, "director_version": result.director_version},
        )
        return result

    async def cancel(self, db: Database, assignment_id: str, actor: str) -> Cancelled:
        """Cancel a device's assignment (``dev-N``) or a tag rule (``tag-N``).

        A cancelled rule applies to no device that gains its tag, and the
        assignments it made that are still current are cancelled with it. A
        device whose assignment is cancelled keeps running what it installed:
        its director metadata names no target any more, so it installs nothing
        new (and stops a download of the cancelled bundle).
        """
        kind, number = parse_assignment_id(assignment_id)
        now = datetime.now(UTC)
        async with db.session() as session:
            rows: list[Assignment]
            rule: AssignmentRule | None = None
            if kind == "tag":
                rule = await session.get(AssignmentRule, number, with_for_update=True)
                if rule is None:
                    raise AssignmentNotFound(f"no assignment {assignment_id}")
                if rule.cancelled_at is not None:
                    raise AssignmentConflict(
                        f"{assignment_id} was already cancelled by {rule.cancelled_by} at "
                        f"{rule.cancelled_at:%Y-%m-%d %H:%M:%S}Z"
                    )
                rule.cancelled_at, rule.cancelled_by = now, actor
                target_path, subject = rule.target_path, rule_label(rule.id)
                rows = [
                    row
                    for row in await current_assignments(session)
                    if row.rule_id == rule.id and row.cancelled_at is None
                ]
            else:
                row = await session.get(Assignment, number)
                if row is None:
                    raise AssignmentNotFound(f"no assignment {assignment_id}")
                if row.cancelled_at is not None:
                    raise AssignmentConflict(
                        f"{assignment_id} was already cancelled by {row.cancelled_by} at "
                        f"{row.cancelled_at:%Y-%m-%d %H:%M:%S}Z"
                    )
                latest = await current_assignment(session, row.device_id)
                if latest is not None and latest.id != row.id:
                    raise AssignmentConflict(
                        f"{assignment_id} is no longer the assignment of {row.device_id}: "
                        f"{device_label(latest.id)} ({latest.target_path}) replaced it; "
                        "cancel that one"
                    )
                target_path, subject = row.target_path, device_label(row.id)
                rows = [row]
            devices = sorted({r.device_id for r in rows})
            locked = await session.execute(
                select(Device).where(Device.id.in_(devices)).order_by(Device.id).with_for_update()
            )
            by_id = {d.id: d for d in locked.scalars()}
            signed = await asyncio.to_thread(
                lambda: {d: self.director.signed(d).version for d in devices}
            )
            versions: dict[str, int] = {}
            for r in rows:
                r.cancelled_at, r.cancelled_by = now, actor
                device = by_id[r.device_id]
                device.assigned_target = None
                device.director_version = max(device.director_version or 0, signed[device.id]) + 1
                versions[device.id] = device.director_version
            release = await session.get(Release, target_path)
            await record(
                session,
                actor,
                "assignment.cancel",
                subject,
                {
                    "target": target_path,
                    "version": release.version if release is not None else None,
                    "tag": rule.tag if rule is not None else None,
                    "devices": devices,
                },
            )
        await self.sync(db, devices)
        return Cancelled(assignment_id, target_path, devices, versions)

    async def sync(self, db: Database, device_ids: Sequence[str] | None = None) -> int:
        """Sign what the database says each device runs where its metadata says otherwise.

        ``device_ids``: only these (default: every device). Returns how many
        devices' metadata was signed; a device whose signing fails is logged
        and kept in :attr:`unsigned` for the next sync.
        """
        query = select(
            Device.id, Device.hardware_id, Device.assigned_target, Device.director_version
        )
        if device_ids is not None:
            query = query.where(Device.id.in_(list(device_ids)))
        # Devices assigned nothing now but once assigned something (a withdrawn assignment)
        # are looked at too: their metadata must come to name nothing.
        once_assigned = or_(Device.assigned_target.is_not(None), Device.director_version > 0)
        async with db.session() as session:
            rows = (await session.execute(query.where(once_assigned))).all()
            targets = {r.assigned_target for r in rows if r.assigned_target is not None}
            releases = {
                r.target_path: released_bundle(r)
                for r in (
                    await session.scalars(select(Release).where(Release.target_path.in_(targets)))
                ).all()
            }
        committed = [
            (Committed(r.id, r.assigned_target, r.director_version or 0), r.hardware_id)
            for r in rows
        ]
        signed_now, to_record, ahead = await asyncio.to_thread(
            self._sign_committed, committed, releases
        )
        if ahead:
            signed_now += await self._realign(db, ahead, releases)
        if to_record:
            async with db.session() as session:
                for device_id, (target_path, version) in sorted(to_record.items()):
                    # Only if no newer assignment was committed meanwhile.
                    same_target = (
                        Device.assigned_target.is_(None)
                        if target_path is None
                        else Device.assigned_target == target_path
                    )
                    await session.execute(
                        update(Device)
                        .where(
                            Device.id == device_id,
                            same_target,
                            Device.director_version < version,
                        )
                        .values(director_version=version)
                    )
        return signed_now

    async def _realign(
        self, db: Database, device_ids: list[str], releases: dict[str, ReleasedBundle]
    ) -> int:
        """Metadata that names another target than the database read: record, then sign.

        The first read may be stale: an assignment committed and signed after
        it looks just like metadata that got ahead of the database. So the row
        is read again under its lock, and only if the metadata still names
        another target is the next version recorded (committed) and signed.
        """
        fresh: list[tuple[Committed, str]] = []
        async with db.session() as session:
            rows = await session.execute(
                select(
                    Device.id, Device.hardware_id, Device.assigned_target, Device.director_version
                )
                .where(Device.id.in_(device_ids))
                .order_by(Device.id)
                .with_for_update()
            )
            for r in rows.all():
                state = Committed(r.id, r.assigned_target, r.director_version or 0)
                step = plan_sync(state, await asyncio.to_thread(self.director.signed, r.id))
                if step is None or not (step.sign and step.record):
                    continue  # in line now, or plainly unsigned: the next sync handles it
                await session.execute(
                    update(Device).where(Device.id == r.id).values(director_version=step.version)
                )
                fresh.append((Committed(r.id, r.assigned_target, step.version), r.hardware_id))
            missing = {c.target_path for c, _ in fresh if c.target_path} - set(releases)
            if missing:
                for row in await session.scalars(
                    select(Release).where(Release.target_path.in_(missing))
                ):
                    releases = {**releases, row.target_path: released_bundle(row)}
        # Committed at the new version: signing it is now the plain "not signed yet" case.
        signed_now, _, _ = await asyncio.to_thread(self._sign_committed, fresh, releases)
        return signed_now

    def _sign_committed(
        self, committed: list[tuple[Committed, str]], releases: dict[str, ReleasedBundle]
    ) -> tuple[int, dict[str, tuple[str | None, int]], list[str]]:
        """Sign what is committed but not signed; returns how many were signed, the
        versions to record, and the devices whose metadata names another target
        (left to :meth:`_realign`, which reads them again first)."""
        signed_now = 0
        to_record: dict[str, tuple[str | None, int]] = {}
        ahead: list[str] = []
        for state, hardware_id in committed:
            try:
                step = plan_sync(state, self.director.signed(state.device_id))
                self.unsigned.discard(state.device_id)
                if step is None:
                    continue
                if step.sign and step.record:
                    ahead.append(state.device_id)
                    continue
                if step.sign and state.target_path is None:
                    self.director.unassign(self.keys, state.device_id, step.version)
                    signed_now += 1
                elif step.sign and state.target_path is not None:
                    bundle = releases.get(state.target_path)
                    if bundle is None:
                        raise RepositoryError(f"no release {state.target_path} in the database")
                    self.director.assign(
                        self.keys, state.device_id, hardware_id, bundle, step.version
                    )
                    signed_now += 1
                if step.record:
                    to_record[state.device_id] = (state.target_path, step.version)
            except Exception as exc:  # one device's failure must not stop the others
                self.unsigned.add(state.device_id)
                log.warning(
                    "could not sign the assignment of %s (%s %s): %s; the next director sync "
                    "tries again",
                    state.device_id,
                    state.target_path,
                    state.director_version,
                    exc,
                )
        return signed_now, to_record, ahead

    async def announce_cancelled(self, versions: Mapping[str, int]) -> None:
        """Publish each device's retained desired state naming no bundle (after commit).

        It replaces the one naming the cancelled bundle, and an online device
        refreshes its director metadata now rather than at its next poll.
        """
        if self.publish is None:
            return
        for device_id, version in sorted(versions.items()):
            await self.publish(
                DesiredState(
                    device_id=device_id,
                    director_version=version,
                    bundle=None,
                    issued_at=time.time(),
                )
            )

    async def announce(self, release: Release, results: Sequence[AssignmentResult]) -> None:
        """Publish the retained desired state of each assigned device (after commit)."""
        if self.publish is None:
            return
        ref = BundleRef(
            name=release.name,
            version=release.version,
            release_counter=release.release_counter,
            sha256=release.sha256,
        )
        for r in results:
            await self.publish(
                DesiredState(
                    device_id=r.device_id,
                    director_version=r.director_version,
                    bundle=ref,
                    issued_at=time.time(),
                )
            )


# -- lifecycle: withdrawing assignments (yanked releases, decommissioned devices) ---------


def refuse_yanked(release: Release) -> None:
    """Raise :class:`ReleaseYanked`, naming the reason, if ``release`` was yanked."""
    if release.yanked_at is not None:
        raise ReleaseYanked(
            f"{release.name} {release.version} was yanked: {release.yank_reason}; "
            "assign another release"
        )


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
    (``assignments list --cancelled`` shows it). Devices already assigned
    nothing are left alone.
    """
    ids = sorted(set(device_ids))
    if not ids:
        return {}
    locked = (
        await session.execute(
            select(Device).where(Device.id.in_(ids)).order_by(Device.id).with_for_update()
        )
    ).scalars()
    devices = [d for d in locked if d.assigned_target is not None]
    signed = await asyncio.to_thread(
        lambda: {d.id: assignments.director.signed(d.id).version for d in devices}
    )
    versions = {}
    now = datetime.now(UTC)
    for device in devices:
        version = max(device.director_version or 0, signed[device.id]) + 1
        device.assigned_target = None
        device.director_version = version
        versions[device.id] = version
        current = await current_assignment(session, device.id)
        if current is not None and current.cancelled_at is None:
            current.cancelled_at, current.cancelled_by = now, actor
    return versions


async def cancel_rules_of(session: AsyncSession, target_path: str, actor: str) -> list[str]:
    """Cancel, in the caller's transaction, the active tag rules that assign ``target_path``."""
    rules = (
        await session.scalars(
            select(AssignmentRule)
            .where(AssignmentRule.target_path == target_path, AssignmentRule.cancelled_at.is_(None))
            .with_for_update()
        )
    ).all()
    now = datetime.now(UTC)
    for rule in rules:
        rule.cancelled_at, rule.cancelled_by = now, actor
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
