"""The director service: assign a released bundle to devices, sign, and tell them.

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
:meth:`DirectorService.sync`, which the server runs at start and hourly: the
outbox is the device table itself, compared with what each device's metadata
names (:func:`plan_sync`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit import record
from fleet_server.db import Database
from fleet_server.db.models import Assignment, Device, Release
from fleet_server.director import DirectorRepository, Signed
from fleet_server.registry import (
    DeviceNotFound,
    RegistryError,
    list_devices,
    refuse_decommissioned,
)
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ReleasedBundle, RepositoryError
from protocol.messages import BundleRef, DesiredState

log = logging.getLogger(__name__)

PublishDesired = Callable[[DesiredState], Awaitable[None]]


class AssignmentError(RegistryError):
    """The assignment cannot be made; the message says why."""


class ReleaseYanked(AssignmentError):
    """The release was yanked: it is assigned to no device any more."""

    status = 409


@dataclass(frozen=True)
class AssignmentResult:
    device_id: str
    target_path: str
    director_version: int


def released_bundle(row: Release) -> ReleasedBundle:
    return ReleasedBundle(
        row.target_path,
        row.name,
        row.version,
        row.release_counter,
        tuple(row.hardware_ids),
        row.sha256,
        row.length,
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
    - an assignment withdrawn (by a yank or a decommission: nothing committed
      at a recorded version) while the metadata still names a target: sign an
      empty assignment, so the device keeps what it runs. A device never
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


class DirectorService:
    """Signs assignments with the director's online key."""

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
    ) -> list[AssignmentResult]:
        """Assign the release at ``target_path`` to the devices named or tagged.

        Records the assignment (commits), then signs what was committed. A
        signing failure after the commit is logged, not raised: the assignment
        stands and :meth:`sync` signs it later.
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
            if tag is not None:
                devices += [
                    d
                    for d in await list_devices(session, tag=tag)
                    if d.id not in {x.id for x in devices}
                ]
            if not devices:
                raise AssignmentError("no device matches the assignment")
            wrong = [d.id for d in devices if d.hardware_id not in release.hardware_ids]
            if wrong:
                raise AssignmentError(
                    f"{release.name} {release.version} is not released for the hardware of "
                    f"{', '.join(wrong)}"
                )
            ids = sorted(d.id for d in devices)
            # Locked in id order, and read again under the lock: two assignments of one
            # device at once get different versions, not the same one twice.
            locked = await session.execute(
                select(Device.id, Device.director_version)
                .where(Device.id.in_(ids))
                .order_by(Device.id)
                .with_for_update()
            )
            recorded = {device_id: version for device_id, version in locked}
            signed = await asyncio.to_thread(
                lambda: {d: self.director.signed(d).version for d in ids}
            )
            results = []
            now = datetime.now(UTC)
            for device in devices:
                version = max(recorded[device.id] or 0, signed[device.id]) + 1
                device.assigned_target = target_path
                device.director_version = version
                session.add(
                    Assignment(
                        device_id=device.id,
                        target_path=target_path,
                        director_version=version,
                        assigned_at=now,
                        actor=actor,
                    )
                )
                results.append(AssignmentResult(device.id, target_path, version))
            await record(
                session,
                actor,
                "assignment.create",
                target_path,
                {"devices": [r.device_id for r in results], "tag": tag, "version": release.version},
            )
        # Committed: now, and only now, the devices may see it.
        await self.sync(db, [r.device_id for r in results])
        return results

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
                    await session.execute(
                        update(Device)
                        .where(
                            Device.id == device_id,
                            Device.assigned_target == target_path,
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
    ) -> tuple[int, dict[str, tuple[str, int]], list[str]]:
        """Sign what is committed but not signed; returns how many were signed, the
        versions to record, and the devices whose metadata names another target
        (left to :meth:`_realign`, which reads them again first)."""
        signed_now = 0
        to_record: dict[str, tuple[str, int]] = {}
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
                if state.target_path is None:
                    if step.sign:  # a withdrawn assignment: the metadata comes to name nothing
                        self.director.unassign(self.keys, state.device_id, step.version)
                        signed_now += 1
                    continue
                if step.sign:
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
    director: DirectorService, session: AsyncSession, device_ids: Sequence[str]
) -> dict[str, int]:
    """Withdraw the devices' assignments in the caller's transaction; their new versions.

    Each device is assigned nothing at its next director version (above both
    the recorded and the signed one), so once the transaction has committed
    :meth:`DirectorService.sync` signs an empty assignment for it: the device
    keeps what it runs. Devices already assigned nothing are left alone.
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
        lambda: {d.id: director.director.signed(d.id).version for d in devices}
    )
    versions = {}
    for device in devices:
        version = max(device.director_version or 0, signed[device.id]) + 1
        device.assigned_target = None
        device.director_version = version
        versions[device.id] = version
    return versions


async def announce_withdrawn(director: DirectorService, versions: dict[str, int]) -> None:
    """Publish, retained, that each device is assigned nothing now (after commit)."""
    if director.publish is None:
        return
    for device_id, version in sorted(versions.items()):
        await director.publish(
            DesiredState(
                device_id=device_id, director_version=version, bundle=None, issued_at=time.time()
            )
        )
