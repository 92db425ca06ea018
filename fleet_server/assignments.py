"""The director service: assign a released bundle to devices, sign, and tell them.

An assignment is recorded in the database and the audit log, signed into the
device's director metadata (which is what the device trusts), and announced
with a retained MQTT desired-state message so an online device acts at once
and an offline one on reconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit import record
from fleet_server.db.models import Assignment, Device, Release
from fleet_server.director import DirectorRepository
from fleet_server.registry import DeviceNotFound, RegistryError, list_devices
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ReleasedBundle, RepositoryError
from protocol.messages import BundleRef, DesiredState

PublishDesired = Callable[[DesiredState], Awaitable[None]]


class AssignmentError(RegistryError):
    """The assignment cannot be made; the message says why."""


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


class DirectorService:
    """Signs assignments with the director's online key."""

    def __init__(
        self, director: DirectorRepository, keys: KeyStore, publish: PublishDesired | None = None
    ) -> None:
        self.director = director
        self.keys = keys
        self.publish = publish

    async def register(self, device_id: str) -> None:
        """Create the device's empty director repository (it can ask before any assignment)."""
        await asyncio.to_thread(self.director.register, self.keys, device_id)

    async def assign(
        self,
        session: AsyncSession,
        *,
        target_path: str,
        actor: str,
        device_ids: Sequence[str] = (),
        tag: str | None = None,
    ) -> list[AssignmentResult]:
        """Assign the release at ``target_path`` to the devices named or tagged."""
        release = await session.get(Release, target_path)
        if release is None:
            raise AssignmentError(f"no release {target_path}; push it first")
        devices: list[Device] = []
        for device_id in device_ids:
            device = await session.get(Device, device_id)
            if device is None:
                raise DeviceNotFound(f"no device {device_id}")
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
        bundle = released_bundle(release)
        results = []
        now = datetime.now(UTC)
        for device in devices:
            try:
                signed = await asyncio.to_thread(
                    self.director.assign, self.keys, device.id, device.hardware_id, bundle
                )
            except RepositoryError as exc:
                raise AssignmentError(str(exc)) from None
            device.assigned_target = target_path
            device.director_version = signed.version
            session.add(
                Assignment(
                    device_id=device.id,
                    target_path=target_path,
                    director_version=signed.version,
                    assigned_at=now,
                    actor=actor,
                )
            )
            results.append(AssignmentResult(device.id, target_path, signed.version))
        await record(
            session,
            actor,
            "assignment.create",
            target_path,
            {"devices": [r.device_id for r in results], "tag": tag, "version": release.version},
        )
        return results

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
