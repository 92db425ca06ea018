"""The director repository: one small TUF repository per device, signed online.

Uptane's second repository. Its metadata names, for one device, the single
bundle it should run now — the same target path, length and hashes as the
image repository, plus the device id and hardware id it is meant for. The
director's key is online (the server holds it), so the device trusts it only
to *choose*: a bundle must also be signed by the offline release keys, and its
release counter may never go down — but for one marked fleet rollback
(``custom.rollback_of``), which a device accepts only for the bundle its other
slot holds from before: one step back, never an arbitrary old release.

Layout::

    DIR/metadata/1.root.json                      the director root (shared)
    DIR/devices/DEVICE_ID/metadata/...            each device's TUF repository

Each assignment is a new targets version, so an older assignment replayed to
a device is refused by ordinary TUF rollback checks. The version is chosen by
the caller (the database records it first; see :mod:`fleet_server.assignments`),
and signing a version that is not newer than the signed one does nothing, so
signing the same committed assignment twice, or an older one after a newer, is
harmless.

What is kept: a device only ever fetches ``timestamp.json``, the snapshot
version it names, the targets version that snapshot names (consistent
snapshots), and the root chain. Every write keeps the current snapshot and
targets and the :data:`KEEP_VERSIONS` - 1 before them, so a device that read
the previous timestamp just before an assignment still finds what it names;
older ones are deleted (a device slower than that gets a 404 and refreshes
again from the new timestamp). Roots are never deleted.

Beside its assignment a device's targets may list one shadow target
(``custom.shadow`` true, :mod:`protocol.director_marks`): a release the device
installs next to its active model and runs on a share of requests without
serving its answers (a rollout's shadow stage). It is signed with the
assignment, at the same versions, so it follows the same record-then-sign
discipline; it never carries ``rollback_of``.

A device's targets may also list one hybrid-inference plan target
(``custom.hybrid_plan``, a :class:`protocol.hybrid.HybridPlan`): not a bundle,
but the plan's canonical JSON, by length and sha256, at
``hybrid-plan/{plan_id}.json`` (:func:`plan_target`). Every re-signing of the
assignment or shadow (:meth:`DirectorRepository.assign`, ``unassign``) keeps the
plan target the metadata lists; only :meth:`DirectorRepository.sign_plan`
replaces or removes it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, TargetFile, Targets

from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import (
    ExpiryPolicy,
    ReleasedBundle,
    RepositoryError,
    TufRepository,
)
from protocol.director_marks import HYBRID_PLAN, ROLLBACK_OF, SHADOW
from protocol.hybrid import HybridPlan

# Snapshot and targets versions kept per device: the current one and the one before.
KEEP_VERSIONS = 2
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Freshness comes from the timestamp, which the server re-signs well before it
# expires (see :meth:`DirectorRepository.refresh_expiring`); targets and snapshot
# are re-signed with every assignment.
DIRECTOR_EXPIRY = ExpiryPolicy(
    root=timedelta(days=365),
    targets=timedelta(days=365),
    snapshot=timedelta(days=365),
    timestamp=timedelta(days=1),
)


@dataclass(frozen=True)
class Assignment:
    """What the director told one device to run."""

    device_id: str
    hardware_id: str
    target_path: str
    release_counter: int
    version: int  # the device's director targets version: grows with every assignment


def assignment_custom(
    device_id: str,
    hardware_id: str,
    bundle: ReleasedBundle,
    rollback_of: str | None = None,
    shadow: bool = False,
) -> dict[str, Any]:
    """The ``custom`` field of a director target.

    ``rollback_of``: the bundle (``ALGORITHM:HEX``) this target replaces in a
    fleet rollback. The device accepts such a target below its release counter
    only if it is exactly the bundle its other slot holds from before, replacing
    the one it runs (see :func:`fleet_server.assignments.planner.plan_rollback`).
    ``shadow``: the target is a shadow install (never a rollback).
    """
    if shadow and rollback_of is not None:
        raise ValueError("a shadow target never carries rollback_of")
    custom: dict[str, Any] = {
        "device_id": device_id,
        "hardware_id": hardware_id,
        "name": bundle.name,
        "version": bundle.version,
        "release_counter": bundle.release_counter,
    }
    if rollback_of is not None:
        custom[ROLLBACK_OF] = rollback_of
    if shadow:
        custom[SHADOW] = True
    return custom


def is_shadow(target: TargetFile) -> bool:
    """Whether a signed director target is marked a shadow install."""
    custom = target.unrecognized_fields.get("custom")
    return isinstance(custom, dict) and custom.get(SHADOW) is True


PLAN_TARGET_PREFIX = "hybrid-plan/"


def plan_target_path(plan_id: str) -> str:
    """Where a plan is listed in a device's director targets."""
    return f"{PLAN_TARGET_PREFIX}{plan_id}.json"


def plan_target(plan: HybridPlan) -> TargetFile:
    """The director target that delivers ``plan``: its canonical JSON's length and sha256,
    the plan itself in ``custom.hybrid_plan`` as the text of that canonical JSON (TUF's
    canonical JSON has no floats; :mod:`protocol.director_marks`), nothing else beside it."""
    data = plan.canonical_json()
    return TargetFile(
        length=len(data),
        hashes={"sha256": hashlib.sha256(data).hexdigest()},
        path=plan_target_path(plan.plan_id),
        unrecognized_fields={"custom": {HYBRID_PLAN: data.decode()}},
    )


def is_plan(target: TargetFile) -> bool:
    """Whether a signed director target is a hybrid plan rather than a bundle."""
    custom = target.unrecognized_fields.get("custom")
    return isinstance(custom, dict) and HYBRID_PLAN in custom


def _plan_id(path: str, target: TargetFile) -> str:
    """The id of the plan a plan target carries; from its path if it does not parse (what
    the server itself signed always does), so reading the assignment never fails on it."""
    try:
        return signed_plan(target).plan_id
    except ValueError:
        return path.removeprefix(PLAN_TARGET_PREFIX).removesuffix(".json")


def signed_plan(target: TargetFile) -> HybridPlan:
    """The plan a plan target carries (``ValueError`` if it does not parse)."""
    custom = target.unrecognized_fields.get("custom")
    if not isinstance(custom, dict):
        raise ValueError(f"{target.path} carries no custom field")
    value = custom.get(HYBRID_PLAN)
    if isinstance(value, str):
        return HybridPlan.model_validate_json(value)
    return HybridPlan.model_validate(value)


@dataclass(frozen=True)
class Signed:
    """What a device's director metadata says now: the target it names and its version."""

    target_path: str | None
    version: int  # 0: the device has no director repository yet
    shadow_path: str | None = None  # the target marked shadow, if one is listed
    plan_id: str | None = None  # the hybrid plan listed, if one is


class DeviceRepository(TufRepository):
    """One device's director repository: signed at versions the caller chooses, pruned."""

    kind = "director repository"

    def signed(self) -> Signed:
        """The current assignment (``None`` for an empty one), its shadow, its targets version."""
        if not self.exists():
            return Signed(None, 0)
        targets: Metadata[Targets] = self._load("targets")
        listed = targets.signed.targets
        bundles = {p: t for p, t in listed.items() if not is_plan(t)}
        paths = sorted(p for p, t in bundles.items() if not is_shadow(t))
        shadows = sorted(p for p, t in bundles.items() if is_shadow(t))
        plans = sorted(_plan_id(p, t) for p, t in listed.items() if is_plan(t))
        return Signed(
            paths[0] if paths else None,
            targets.signed.version,
            shadows[0] if shadows else None,
            plans[0] if plans else None,
        )

    def sign(
        self,
        keys: KeyStore,
        targets: dict[str, TargetFile],
        version: int | None,
        *,
        keep_plan: bool = False,
    ) -> int:
        """Sign ``targets`` as targets ``version`` (``None``: the next one); returns the version.

        ``keep_plan``: ``targets`` are the bundles, and the plan target the
        metadata lists stays listed beside them (read under the same lock, so a
        plan signed meanwhile is not lost). A version that is not newer than
        the signed one is not signed: the current version is returned and
        nothing changes.
        """
        with self._locked():
            if not self.exists():
                raise RepositoryError(f"{self.path} holds no {self.kind} yet")
            metadata: Metadata[Targets] = self._load("targets")
            current = metadata.signed.version
            if version is not None and version <= current:
                return current
            listed = dict(targets)
            if keep_plan:
                listed = {p: t for p, t in listed.items() if not is_plan(t)}
                listed.update({p: t for p, t in metadata.signed.targets.items() if is_plan(t)})
            return self._sign_locked(keys, metadata, listed, version)

    def sign_plan(self, keys: KeyStore, plan: HybridPlan | None, version: int | None) -> int:
        """List ``plan`` as the device's only plan target (``None``: none) beside the bundles
        the metadata lists, as targets ``version`` (``None``: the next one).

        As :meth:`sign`, a version not newer than the signed one signs nothing.
        """
        with self._locked():
            if not self.exists():
                raise RepositoryError(f"{self.path} holds no {self.kind} yet")
            metadata: Metadata[Targets] = self._load("targets")
            current = metadata.signed.version
            if version is not None and version <= current:
                return current
            bundles = {p: t for p, t in metadata.signed.targets.items() if not is_plan(t)}
            if plan is not None:
                bundles[plan_target_path(plan.plan_id)] = plan_target(plan)
            return self._sign_locked(keys, metadata, bundles, version)

    def _sign_locked(
        self,
        keys: KeyStore,
        metadata: Metadata[Targets],
        targets: dict[str, TargetFile],
        version: int | None,
    ) -> int:
        metadata.signed.targets = dict(targets)
        self._bump(metadata.signed, self.expiry.targets)
        if version is not None:
            metadata.signed.version = version
        self._write(metadata, keys, "targets", versioned=True)
        snapshot_version = self._load("snapshot").signed.version + 1
        self._publish_snapshot_and_timestamp(keys, snapshot_version)
        self._prune_locked()
        return metadata.signed.version

    def prune(self) -> int:
        """Delete snapshot and targets versions no device can still need; returns how many."""
        with self._locked():
            return self._prune_locked() if self.exists() else 0

    def _prune_locked(self) -> int:
        removed = 0
        for role in ("snapshot", "targets"):
            files = sorted(
                (int(p.name.split(".")[0]), p)
                for p in self.metadata_dir.glob(f"*.{role}.json")
                if p.name.split(".")[0].isdigit()
            )
            for _, path in files[:-KEEP_VERSIONS]:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class DirectorRepository:
    """Signs and stores every device's director metadata under ``path``."""

    def __init__(
        self,
        path: Path,
        expiry: ExpiryPolicy = DIRECTOR_EXPIRY,
        now: datetime | None = None,
    ) -> None:
        self.path = path
        self.expiry = expiry
        self._now = now
        self._root_repo = TufRepository(path, expiry, now)

    @property
    def trusted_root_path(self) -> Path:
        """The director root devices are provisioned with."""
        return self._root_repo.trusted_root_path

    def exists(self) -> bool:
        return self.trusted_root_path.exists()

    def create(self, keys: KeyStore) -> None:
        """Create the director root, signed by the director's keys."""
        if self.exists():
            raise RepositoryError(f"{self.path} already holds a director")
        self._root_repo.create(keys)

    def device(self, device_id: str) -> DeviceRepository:
        """The TUF repository of one device (not created until its first assignment)."""
        if not DEVICE_ID_PATTERN.match(device_id):
            raise RepositoryError(
                f"device id {device_id!r} has characters outside A-Z a-z 0-9 . _ -"
            )
        return DeviceRepository(self.path / "devices" / device_id, self.expiry, self._now)

    def signed(self, device_id: str) -> Signed:
        """What ``device_id``'s director metadata names now."""
        return self.device(device_id).signed()

    def assign(
        self,
        keys: KeyStore,
        device_id: str,
        hardware_id: str,
        bundle: ReleasedBundle,
        version: int | None = None,
        rollback_of: str | None = None,
        shadow: ReleasedBundle | None = None,
    ) -> Assignment:
        """Tell ``device_id`` to run ``bundle``; refuses a bundle not made for its hardware.

        ``rollback_of``: sign it as a marked fleet rollback replacing that bundle
        (``ALGORITHM:HEX``, a :class:`~fleet_server.assignments.planner.RollbackPlan`'s).
        ``shadow``: list that release beside it as the device's shadow install.

        ``version`` is the targets version to sign (default: the next one); if
        the device's metadata is already at that version or newer, nothing is
        signed and the returned assignment carries the current version.
        """
        if hardware_id not in bundle.hardware_ids:
            raise RepositoryError(
                f"{bundle.name} {bundle.version} is not released for hardware {hardware_id}"
            )
        repo = self._ensure_device(keys, device_id)
        target = _target(device_id, hardware_id, bundle, rollback_of)
        targets = {bundle.target_path: target, **self._shadow(device_id, hardware_id, shadow)}
        signed = repo.sign(keys, targets, version, keep_plan=True)
        return Assignment(
            device_id, hardware_id, bundle.target_path, bundle.release_counter, signed
        )

    def register(self, keys: KeyStore, device_id: str) -> None:
        """Create a device's (empty) repository so it can ask before its first assignment."""
        self._ensure_device(keys, device_id)

    def unassign(
        self,
        keys: KeyStore,
        device_id: str,
        version: int | None = None,
        shadow: ReleasedBundle | None = None,
        hardware_id: str | None = None,
    ) -> int:
        """Tell ``device_id`` to keep what it runs (an empty assignment) at ``version``.

        ``version`` as in :meth:`assign` (default: the next one); ``shadow`` (with
        the device's ``hardware_id``): the shadow install listed alone.
        """
        targets: dict[str, TargetFile] = {}
        if shadow is not None:
            if hardware_id is None:
                raise ValueError("a shadow target names the device's hardware id")
            targets = self._shadow(device_id, hardware_id, shadow)
        return self._ensure_device(keys, device_id).sign(keys, targets, version, keep_plan=True)

    @staticmethod
    def _shadow(
        device_id: str, hardware_id: str, shadow: ReleasedBundle | None
    ) -> dict[str, TargetFile]:
        if shadow is None:
            return {}
        if hardware_id not in shadow.hardware_ids:
            raise RepositoryError(
                f"{shadow.name} {shadow.version} is not released for hardware {hardware_id}"
            )
        return {shadow.target_path: _target(device_id, hardware_id, shadow, shadow=True)}

    def sign_plan(
        self, keys: KeyStore, device_id: str, plan: HybridPlan | None, version: int | None = None
    ) -> int:
        """List ``plan`` in ``device_id``'s metadata (``None``: drop its plan), keeping its
        assignment and shadow; returns the targets version signed (or the current one)."""
        if plan is not None and plan.device_id != device_id:
            raise RepositoryError(f"plan {plan.plan_id} is for {plan.device_id}, not {device_id}")
        return self._ensure_device(keys, device_id).sign_plan(keys, plan, version)

    def refresh_timestamp(self, keys: KeyStore, device_id: str) -> int:
        """Re-sign one device's timestamp before it expires."""
        return self.device(device_id).refresh_timestamp(keys)

    def refresh_expiring(self, keys: KeyStore, within: timedelta) -> int:
        """Re-sign every device timestamp that expires within ``within``; returns how many."""
        devices = self.path / "devices"
        if not devices.is_dir():
            return 0
        refreshed = 0
        deadline = datetime.now(UTC) + within
        for folder in sorted(p for p in devices.iterdir() if p.is_dir()):
            repo = DeviceRepository(folder, self.expiry, self._now)
            if repo.exists() and repo.timestamp_expires() <= deadline:
                repo.refresh_timestamp(keys)
                refreshed += 1
        return refreshed

    def prune_all(self) -> int:
        """Prune every device's repository (folders written before pruning existed); how many."""
        devices = self.path / "devices"
        if not devices.is_dir():
            return 0
        return sum(
            DeviceRepository(folder, self.expiry, self._now).prune()
            for folder in sorted(p for p in devices.iterdir() if p.is_dir())
        )

    def _ensure_device(self, keys: KeyStore, device_id: str) -> DeviceRepository:
        repo = self.device(device_id)
        if not repo.exists():
            repo.create(keys, root=self.trusted_root_path.read_bytes())
        return repo


def _target(
    device_id: str,
    hardware_id: str,
    bundle: ReleasedBundle,
    rollback_of: str | None = None,
    shadow: bool = False,
) -> TargetFile:
    return TargetFile(
        length=bundle.length,
        hashes={"sha256": bundle.sha256},
        path=bundle.target_path,
        unrecognized_fields={
            "custom": assignment_custom(device_id, hardware_id, bundle, rollback_of, shadow)
        },
    )
