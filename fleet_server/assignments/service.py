"""The assignment service: records what the planner allows, signs it, announces it.

An assignment names devices, or a tag: a tag assignment is a rule
(``assignment_rules``) that also gives its release to every device that gains
the tag later (:meth:`AssignmentService.apply_rules`). Precedence for a device
gaining a tag: an assignment made for the device by name overrides tag rules,
and of two rules matching it, the newest wins. A release below the counter a
device reports running is refused up front (the device would refuse it); an
old model goes back out as a re-release above the counter. These rules are
:mod:`fleet_server.assignments.planner`'s; the SQL is
:mod:`fleet_server.assignments.store`'s. Cancelling
(:meth:`AssignmentService.cancel`) signs metadata that names nothing, so the
device keeps what it runs. Beside its assignment a device may hold a shadow
install (:meth:`AssignmentService.set_shadows`, a rollout's shadow stage),
signed in the same metadata and cleared when the device is assigned that
release to serve.

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
names (:func:`~fleet_server.assignments.planner.plan_sync`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.assignments import store
from fleet_server.assignments.models import (
    Assigned,
    AssignmentConflict,
    AssignmentError,
    AssignmentNotFound,
    AssignmentResult,
    Cancelled,
    Committed,
)
from fleet_server.assignments.planner import (
    RollbackPlan,
    check_assignment,
    device_label,
    parse_assignment_id,
    plan_sync,
    refuse_cancelled,
    refuse_yanked,
    rule_label,
    rule_skip_reason,
    rule_to_apply,
)
from fleet_server.audit import record
from fleet_server.db import Database
from fleet_server.db.models import Assignment, AssignmentRule, Device, Release
from fleet_server.devices.errors import DeviceNotFound
from fleet_server.devices.store import list_devices, refuse_decommissioned
from fleet_server.director import DirectorRepository, Signed
from fleet_server.published.rules import released_bundle
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ReleasedBundle, RepositoryError
from protocol.messages import BundleRef, DesiredState

log = logging.getLogger(__name__)

PublishDesired = Callable[[DesiredState], Awaitable[None]]


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
            check_assignment(release, devices, tag)
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

    async def rollback(
        self, db: Database, plans: Sequence[RollbackPlan], actor: str, subject: str
    ) -> list[AssignmentResult]:
        """Record and sign each marked fleet rollback (a :class:`RollbackPlan`).

        The device's assignment names the release it ran before, marked as
        replacing the bundle it runs (``rollback_of``); the marker is kept with
        the assignment (``devices.assigned_rollback_of``), so every later
        signing of it (:meth:`sync`) carries it too. Audited under ``subject``.
        """
        if not plans:
            return []
        by_id = {p.device_id: p for p in plans}
        ids = sorted(by_id)
        async with db.session() as session:
            recorded = await store.lock_recorded_versions(session, ids)
            signed = await asyncio.to_thread(
                lambda: {d: self.director.signed(d).version for d in ids}
            )
            now = datetime.now(UTC)
            results = []
            for device_id in ids:
                plan = by_id[device_id]
                device = await session.get(Device, device_id)
                if device is None:
                    raise DeviceNotFound(f"no device {device_id}")
                version = max(recorded[device_id] or 0, signed[device_id]) + 1
                device.assigned_target = plan.target_path
                device.assigned_rollback_of = plan.rollback_of
                device.director_version = version
                session.add(
                    Assignment(
                        device_id=device_id,
                        target_path=plan.target_path,
                        director_version=version,
                        assigned_at=now,
                        actor=actor,
                    )
                )
                results.append(AssignmentResult(device_id, plan.target_path, version))
            await session.flush()
            await record(
                session,
                actor,
                "assignment.rollback",
                subject,
                {
                    "devices": ids,
                    "targets": sorted({p.target_path for p in plans}),
                },
            )
        await self.sync(db, ids)
        return results

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
        recorded = await store.lock_recorded_versions(session, ids)
        signed = await asyncio.to_thread(lambda: {d: self.director.signed(d).version for d in ids})
        results = []
        now = datetime.now(UTC)
        for device, rule_id in devices:
            version = max(recorded[device.id] or 0, signed[device.id]) + 1
            device.assigned_target = release.target_path
            device.assigned_rollback_of = None
            if device.shadow_target == release.target_path:  # it serves its shadow from now on
                device.shadow_target = device.shadow_rollout = None
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

    async def set_shadows(
        self,
        db: Database,
        device_ids: Sequence[str],
        target_path: str | None,
        rollout: str,
        actor: str,
    ) -> list[str]:
        """Give each device ``target_path`` as its shadow install for ``rollout``, or
        (``None``) drop the shadow ``rollout`` gave it; returns the devices changed.

        A device's assignment stays as it is; a device whose shadow belongs to
        another rollout, that is assigned ``target_path`` already, or whose
        hardware the release is not for, is left alone. Recorded (a new director
        version, audited as ``assignment.shadow`` or ``assignment.shadow-drop``
        under ``rollout``), then signed and announced, like an assignment.
        """
        ids = sorted(set(device_ids))
        if not ids:
            return []
        async with db.session() as session:
            release = None
            if target_path is not None:
                release = await session.get(Release, target_path)
                if release is None:
                    raise AssignmentError(f"no release {target_path}; push it first")
                refuse_yanked(release)
            recorded = await store.lock_recorded_versions(session, ids)
            signed = await asyncio.to_thread(
                lambda: {d: self.director.signed(d).version for d in ids}
            )
            changed: list[str] = []
            for device in await store.lock_devices(session, ids):
                if release is None:
                    if device.shadow_rollout != rollout:
                        continue
                    device.shadow_target = device.shadow_rollout = None
                else:
                    if device.shadow_rollout not in (None, rollout):
                        continue
                    if device.assigned_target == release.target_path:
                        continue
                    if device.hardware_id not in (release.hardware_ids or []):
                        continue
                    if device.shadow_target == release.target_path:
                        continue
                    device.shadow_target, device.shadow_rollout = release.target_path, rollout
                version = max(recorded[device.id] or 0, signed[device.id]) + 1
                device.director_version = version
                changed.append(device.id)
            if changed:
                await record(
                    session,
                    actor,
                    "assignment.shadow" if release is not None else "assignment.shadow-drop",
                    rollout,
                    {
                        "devices": changed,
                        "target": target_path,
                        "version": release.version if release is not None else None,
                    },
                )
        if changed:
            await self.sync(db, changed)
            await self.announce_changed(db, changed)
        return changed

    async def announce_changed(self, db: Database, device_ids: Sequence[str]) -> None:
        """Publish each device's retained desired state at its recorded director version
        (after commit), naming its assignment: it refreshes its metadata now."""
        if self.publish is None or not device_ids:
            return
        async with db.session() as session:
            devices = await store.devices_by_id(session, device_ids)
            targets = {d.assigned_target for d in devices if d.assigned_target is not None}
            releases = await store.releases_by_path(session, targets)
        for device in devices:
            release = releases.get(device.assigned_target or "")
            ref = None
            if release is not None:
                ref = BundleRef(
                    name=release.name,
                    version=release.version,
                    release_counter=release.release_counter,
                    sha256=release.sha256,
                )
            await self.publish(
                DesiredState(
                    device_id=device.id,
                    director_version=device.director_version,
                    bundle=ref,
                    issued_at=time.time(),
                )
            )

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
        rules = await store.rules(session, tags=tags)
        current = await store.current_assignment(session, device.id)
        assigned = current is not None and current.cancelled_at is None
        rule = rule_to_apply(
            rules,
            tags,
            gained,
            current.rule_id if current is not None else None,
            assigned and bool(device.assigned_target),
        )
        if rule is None:
            return None  # no rule, or assigned by name (overrides rules) or by this rule already
        release = await session.get(Release, rule.target_path)
        assert release is not None  # a rule's release is a foreign key
        details = {
            "device": device.id,
            "rule": rule_label(rule.id),
            "tag": rule.tag,
            "version": release.version,
            "release_counter": release.release_counter,
        }
        why_not = rule_skip_reason(release, device)
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
                refuse_cancelled(assignment_id, rule.cancelled_at, rule.cancelled_by)
                rule.cancelled_at, rule.cancelled_by = now, actor
                target_path, subject = rule.target_path, rule_label(rule.id)
                rows = [
                    row
                    for row in await store.current_assignments(session)
                    if row.rule_id == rule.id and row.cancelled_at is None
                ]
            else:
                row = await session.get(Assignment, number)
                if row is None:
                    raise AssignmentNotFound(f"no assignment {assignment_id}")
                refuse_cancelled(assignment_id, row.cancelled_at, row.cancelled_by)
                latest = await store.current_assignment(session, row.device_id)
                if latest is not None and latest.id != row.id:
                    raise AssignmentConflict(
                        f"{assignment_id} is no longer the assignment of {row.device_id}: "
                        f"{device_label(latest.id)} ({latest.target_path}) replaced it; "
                        "cancel that one"
                    )
                target_path, subject = row.target_path, device_label(row.id)
                rows = [row]
            devices = sorted({r.device_id for r in rows})
            by_id = {d.id: d for d in await store.lock_devices(session, devices)}
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
        async with db.session() as session:
            # Devices assigned nothing now but once assigned something (a withdrawn
            # assignment) are looked at too: their metadata must come to name nothing.
            rows = await store.committed_rows(session, device_ids)
            targets = {r.assigned_target for r in rows if r.assigned_target is not None}
            targets |= {r.shadow_target for r in rows if r.shadow_target is not None}
            releases = {
                path: released_bundle(r)
                for path, r in (await store.releases_by_path(session, targets)).items()
            }
        committed = [
            (
                Committed(
                    r.id,
                    r.assigned_target,
                    r.director_version or 0,
                    r.assigned_rollback_of,
                    r.shadow_target,
                ),
                r.hardware_id,
            )
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
                    await store.record_version(session, device_id, target_path, version)
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
            for r in await store.committed_rows(session, device_ids, lock=True):
                state = Committed(
                    r.id,
                    r.assigned_target,
                    r.director_version or 0,
                    r.assigned_rollback_of,
                    r.shadow_target,
                )
                step = plan_sync(state, await asyncio.to_thread(self.director.signed, r.id))
                if step is None or not (step.sign and step.record):
                    continue  # in line now, or plainly unsigned: the next sync handles it
                await store.set_version(session, r.id, step.version)
                fresh.append((replace(state, director_version=step.version), r.hardware_id))
            missing = {p for c, _ in fresh for p in (c.target_path, c.shadow_path) if p}
            missing -= set(releases)
            if missing:
                for path, row in (await store.releases_by_path(session, missing)).items():
                    releases = {**releases, path: released_bundle(row)}
        # Committed at the new version: signing it is now the plain "not signed yet" case.
        signed_now, _, overtaken = await asyncio.to_thread(self._sign_committed, fresh, releases)
        if overtaken:  # overtaken again: retried within a minute (the server's director step)
            log.warning("assignments of %s overtaken while signed; retried", ", ".join(overtaken))
            self.unsigned.update(overtaken)
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
                shadow = None
                if step.sign and state.shadow_path is not None:
                    shadow = releases.get(state.shadow_path)
                    if shadow is None:
                        raise RepositoryError(f"no release {state.shadow_path} in the database")
                if step.sign and state.target_path is None:
                    self.director.unassign(
                        self.keys, state.device_id, step.version, shadow, hardware_id
                    )
                elif step.sign and state.target_path is not None:
                    bundle = releases.get(state.target_path)
                    if bundle is None:
                        raise RepositoryError(f"no release {state.target_path} in the database")
                    self.director.assign(
                        self.keys,
                        state.device_id,
                        hardware_id,
                        bundle,
                        step.version,
                        rollback_of=state.rollback_of,
                        shadow=shadow,
                    )
                if step.sign and not _names(self.director.signed(state.device_id), state):
                    # Overtaken between the look and the signing: another writer (the hybrid
                    # planner, signing a plan beside the bundles it read) signed this version
                    # or a later one first, so nothing was signed here. Looked at again.
                    ahead.append(state.device_id)
                    continue
                signed_now += step.sign
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


def _names(signed: Signed, committed: Committed) -> bool:
    """Whether ``signed`` names the targets ``committed`` says (at whatever version)."""
    return (signed.target_path, signed.shadow_path) == (
        committed.target_path,
        committed.shadow_path,
    )
