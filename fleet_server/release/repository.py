"""The image repository: TUF metadata and bundle targets in a plain directory.

Layout (any static HTTP server can serve it)::

    REPO/metadata/1.root.json  N.root.json   trusted root = 1.root.json
    REPO/metadata/N.targets.json  N.snapshot.json  timestamp.json
    REPO/targets/NAME/SHA256.NAME-VERSION.bundle   (consistent snapshots)

Every bundle is a TUF target whose ``custom`` field carries the bundle's name,
version, release counter and hardware ids, so a device can choose a bundle and
check it is meant for it before downloading anything. Writes happen in the
order a reader needs (targets, then snapshot, then timestamp), each file
atomically, under an exclusive lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from fleet_server.release.keys import KeyStore
from protocol.bundle import BundleFormatError, read_bundle, read_manifest, write_bundle
from protocol.manifest import Manifest
from protocol.versioning import default_release_counter, parse_semver

SPEC_VERSION = "1.0.31"


class RepositoryError(Exception):
    """The image repository cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)


@dataclass(frozen=True)
class ReleasedBundle:
    """A bundle as the image repository lists it."""

    target_path: str
    name: str
    version: str
    release_counter: int
    hardware_ids: tuple[str, ...]
    sha256: str
    length: int
    # A re-release: the version whose model this bundle carries, above the current counter.
    re_release_of: str | None = None


def bundle_custom(manifest: Manifest, re_release_of: str | None = None) -> dict[str, Any]:
    """The TUF ``custom`` field that describes a bundle (and which version it re-releases)."""
    custom: dict[str, Any] = {
        "name": manifest.name,
        "version": manifest.version,
        "release_counter": manifest.release_counter,
        "hardware_ids": list(manifest.hardware_ids),
    }
    if re_release_of is not None:
        custom["re_release_of"] = re_release_of
    return custom


class TufRepository:
    """A TUF repository (root, targets, snapshot, timestamp) in a directory.

    The image repository and each device's director repository are both this;
    they differ only in what they list as targets.
    """

    kind = "TUF repository"

    def __init__(
        self,
        path: Path,
        expiry: ExpiryPolicy | None = None,
        now: datetime | None = None,
    ) -> None:
        self.path = path
        self.expiry = expiry or ExpiryPolicy()
        # An injected "now" lets tests sign metadata that is already expired.
        self._now = now
        self._serializer = JSONSerializer(compact=False)

    @property
    def metadata_dir(self) -> Path:
        return self.path / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.path / "targets"

    @property
    def trusted_root_path(self) -> Path:
        """The root a device must be provisioned with."""
        return self.metadata_dir / "1.root.json"

    def exists(self) -> bool:
        return (self.metadata_dir / "timestamp.json").exists()

    def _expires(self, lifetime: timedelta) -> datetime:
        now = self._now or datetime.now(UTC)
        return (now + lifetime).replace(microsecond=0)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- creating --------------------------------------------------------

    def create(self, keys: KeyStore, root: bytes | None = None) -> None:
        """Create version 1 of every role, signed by ``keys``.

        ``root`` reuses an existing signed root (devices of one director share it).
        """
        with self._locked():
            if self.exists():
                raise RepositoryError(f"{self.path} already holds a {self.kind}")
            if root is not None:
                self.metadata_dir.mkdir(parents=True, exist_ok=True)
                _atomic_write(self.trusted_root_path, root)
            else:
                self._write(Metadata(self._new_root(keys)), keys, "root", versioned=True)
            targets = Targets(expires=self._expires(self.expiry.targets))
            targets.spec_version = SPEC_VERSION
            self._write(Metadata(targets), keys, "targets", versioned=True)
            self._publish_snapshot_and_timestamp(keys, snapshot_version=1)

    def _new_root(self, keys: KeyStore) -> Root:
        root = Root(expires=self._expires(self.expiry.root), consistent_snapshot=True)
        for role in ("root", "targets", "snapshot", "timestamp"):
            for key in keys[role].public_keys:
                root.add_key(key, role)
            root.roles[role].threshold = keys[role].threshold
        root.spec_version = SPEC_VERSION
        return root

    # -- reading ---------------------------------------------------------

    def _load(self, role: str) -> Metadata[Any]:
        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        if role == "root":
            versions = sorted(
                int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json")
            )
            return Metadata.from_file(str(self.metadata_dir / f"{versions[-1]}.root.json"))
        timestamp: Metadata[Timestamp] = self._load("timestamp")
        snapshot_version = timestamp.signed.snapshot_meta.version
        if role == "snapshot":
            return Metadata.from_file(str(self.metadata_dir / f"{snapshot_version}.snapshot.json"))
        snapshot: Metadata[Snapshot] = self._load("snapshot")
        version = snapshot.signed.meta[f"{role}.json"].version
        return Metadata.from_file(str(self.metadata_dir / f"{version}.{role}.json"))

    def targets(self) -> dict[str, TargetFile]:
        """The targets the current targets metadata lists."""
        if not self.exists():
            return {}
        targets: Metadata[Targets] = self._load("targets")
        return dict(targets.signed.targets)

    def set_targets(self, keys: KeyStore, targets: dict[str, TargetFile]) -> int:
        """Replace the listed targets and re-sign targets, snapshot and timestamp.

        Returns the new targets version. The caller holds no lock; this takes it.
        """
        with self._locked():
            return self._set_targets_locked(keys, targets)

    def _set_targets_locked(self, keys: KeyStore, targets: dict[str, TargetFile]) -> int:
        if not self.exists():
            raise RepositoryError(f"{self.path} holds no {self.kind} yet")
        self._require_trusted(keys, "targets", "snapshot", "timestamp")
        metadata: Metadata[Targets] = self._load("targets")
        metadata.signed.targets = dict(targets)
        self._bump(metadata.signed, self.expiry.targets)
        self._write(metadata, keys, "targets", versioned=True)
        snapshot_version = self._load("snapshot").signed.version + 1
        self._publish_snapshot_and_timestamp(keys, snapshot_version)
        return metadata.signed.version

    def timestamp_expires(self) -> datetime:
        """When the current timestamp metadata expires."""
        expires: datetime = self._load("timestamp").signed.expires
        return expires

    def refresh_timestamp(self, keys: KeyStore) -> int:
        """Re-sign the timestamp with a new expiry (run at least daily); returns its version."""
        with self._locked():
            if not self.exists():
                raise RepositoryError(f"{self.path} holds no {self.kind}")
            self._require_trusted(keys, "timestamp")
            timestamp: Metadata[Timestamp] = self._load("timestamp")
            self._bump(timestamp.signed, self.expiry.timestamp)
            self._write(timestamp, keys, "timestamp", versioned=False)
            return timestamp.signed.version

    def _require_trusted(self, keys: KeyStore, *roles: str) -> None:
        """Refuse, before anything is written, keys the current root does not trust.

        Metadata signed by untrusted keys would be refused by every device, and
        a later run with the right keys could not repair it (the versions are
        already used), so this is checked up front for each role about to be signed.
        """
        root: Metadata[Root] = self._load("root")
        for role in roles:
            trusted = root.signed.roles[role]
            offered = [key.keyid for key in keys[role].public_keys]
            accepted = [keyid for keyid in offered if keyid in trusted.keyids]
            if len(accepted) < trusted.threshold:
                raise RepositoryError(
                    f"the {role} keys given (key ids {_short_ids(offered)}) are not trusted "
                    f"for the {role} role by the root of {self.path}, which needs "
                    f"{trusted.threshold} of key ids {_short_ids(trusted.keyids)}; "
                    "give this repository's release keys"
                )

    def _bump(self, signed: Signed, lifetime: timedelta) -> None:
        signed.version += 1
        signed.expires = self._expires(lifetime)

    def _publish_snapshot_and_timestamp(self, keys: KeyStore, snapshot_version: int) -> None:
        targets_version = self._load_version("targets")
        snapshot = Snapshot(
            version=snapshot_version,
            expires=self._expires(self.expiry.snapshot),
            meta={"targets.json": MetaFile(version=targets_version)},
        )
        snapshot.spec_version = SPEC_VERSION
        snapshot_bytes = self._write(Metadata(snapshot), keys, "snapshot", versioned=True)
        previous = 0
        if (self.metadata_dir / "timestamp.json").exists():
            previous = self._load("timestamp").signed.version
        timestamp = Timestamp(
            version=previous + 1,
            expires=self._expires(self.expiry.timestamp),
            snapshot_meta=MetaFile(
                version=snapshot_version,
                length=len(snapshot_bytes),
                hashes={"sha256": hashlib.sha256(snapshot_bytes).hexdigest()},
            ),
        )
        timestamp.spec_version = SPEC_VERSION
        self._write(Metadata(timestamp), keys, "timestamp", versioned=False)

    def _load_version(self, role: str) -> int:
        versions = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob(f"*.{role}.json")]
        return max(versions)

    def _write(self, md: Metadata[Any], keys: KeyStore, role: str, versioned: bool) -> bytes:
        md.signatures.clear()
        for signer in keys[role].signers:
            md.sign(signer, append=True)
        data = md.to_bytes(self._serializer)
        name = f"{md.signed.version}.{role}.json" if versioned else f"{role}.json"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.metadata_dir / name, data)
        return data


class ImageRepository(TufRepository):
    """The image repository: every released bundle, signed by the offline release keys."""

    kind = "image repository"

    def bundles(self) -> list[ReleasedBundle]:
        """Every released bundle, oldest release counter first."""
        if not self.exists():
            return []
        targets: Metadata[Targets] = self._load("targets")
        out = []
        for path, target in targets.signed.targets.items():
            custom = target.custom or {}
            out.append(
                ReleasedBundle(
                    target_path=path,
                    name=str(custom.get("name")),
                    version=str(custom.get("version")),
                    release_counter=int(custom.get("release_counter", 0)),
                    hardware_ids=tuple(custom.get("hardware_ids", ())),
                    sha256=target.hashes["sha256"],
                    length=target.length,
                    re_release_of=(
                        str(custom["re_release_of"]) if custom.get("re_release_of") else None
                    ),
                )
            )
        return sorted(out, key=lambda b: (b.name, b.release_counter))

    # -- changing --------------------------------------------------------

    def add_bundle(
        self, bundle: Path, keys: KeyStore, re_release_of: str | None = None
    ) -> ReleasedBundle:
        """Add a bundle as a target and re-sign targets, snapshot and timestamp.

        Releasing the same bytes twice is a no-op; releasing different bytes
        under a name and version, or a release counter already used for that
        name, is refused.
        """
        try:
            with bundle.open("rb") as f:
                manifest = read_manifest(f)
        except FileNotFoundError:
            raise RepositoryError(f"bundle {bundle} does not exist") from None
        except BundleFormatError as exc:
            raise RepositoryError(f"{bundle} is not a valid bundle: {exc}") from None
        digest, length = _sha256_file(bundle)
        released = ReleasedBundle(
            target_path=manifest.target_path,
            name=manifest.name,
            version=manifest.version,
            release_counter=manifest.release_counter,
            hardware_ids=tuple(manifest.hardware_ids),
            sha256=digest,
            length=length,
            re_release_of=re_release_of,
        )
        with self._locked():
            if not self.exists():
                raise RepositoryError(f"{self.path} holds no {self.kind} yet")
            for existing in self.bundles():
                if existing.target_path == released.target_path:
                    if existing.sha256 == digest:
                        return existing
                    raise RepositoryError(
                        f"{manifest.name} {manifest.version} is already released with "
                        "different content; build it with a new version"
                    )
                if (
                    existing.name == manifest.name
                    and existing.release_counter == manifest.release_counter
                ):
                    raise RepositoryError(
                        f"release counter {manifest.release_counter} is already used by "
                        f"{existing.name} {existing.version}; give the bundle a higher one"
                    )
            self._require_trusted(keys, "targets", "snapshot", "timestamp")
            dest = self._target_file(released.target_path, digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".partial")
            shutil.copyfile(bundle, tmp)
            _fsync_file(tmp)
            os.replace(tmp, dest)
            listed = self.targets()
            listed[released.target_path] = TargetFile(
                length=length,
                hashes={"sha256": digest},
                path=released.target_path,
                unrecognized_fields={"custom": bundle_custom(manifest, re_release_of)},
            )
            self._set_targets_locked(keys, listed)
        return released

    def re_release(
        self, name: str, version: str, keys: KeyStore, new_version: str | None = None
    ) -> ReleasedBundle:
        """Release the model of ``name`` ``version`` again, above every counter of ``name``.

        Devices never install a lower release counter, so going back to an old
        model is a new release: the old bundle's model, golden vectors and
        baseline under ``new_version`` (default: the next patch version after
        the highest released one) and that version's release counter, which
        must be above the highest of ``name``. Its manifest's description and
        its target's ``re_release_of`` field say which version it carries.
        """
        bundles = [b for b in self.bundles() if b.name == name]
        old = next((b for b in bundles if b.version == version), None)
        if old is None:
            known = ", ".join(b.version for b in bundles) or "none"
            raise RepositoryError(
                f"{self.path} holds no {name} {version} to re-release (its versions: {known})"
            )
        highest = max(bundles, key=lambda b: b.release_counter)
        if new_version is None:
            top = parse_semver(highest.version)
            new_version = f"{top.major}.{top.minor}.{top.patch + 1}"
        try:
            counter = default_release_counter(new_version)
        except ValueError as exc:
            raise RepositoryError(f"version {new_version}: {exc}") from None
        if counter <= highest.release_counter:
            raise RepositoryError(
                f"version {new_version} has release counter {counter}, not above "
                f"{highest.release_counter} of {name} {highest.version}; give a higher version"
            )
        source = self._target_file(old.target_path, old.sha256)
        try:
            with source.open("rb") as f:
                manifest, members = read_bundle(f)
        except (OSError, BundleFormatError) as exc:
            raise RepositoryError(
                f"cannot read {old.target_path} to re-release it: {exc}"
            ) from None
        note = f"re-release of {name} {version} (sha256 {old.sha256})"
        description = f"{manifest.description} ({note})" if manifest.description else note
        fields = {
            **manifest.model_dump(mode="json"),
            "version": new_version,
            "release_counter": counter,
            "description": description,
        }
        try:
            renewed = Manifest.model_validate(fields)
        except ValueError as exc:
            raise RepositoryError(f"version {new_version}: {exc}") from None
        with tempfile.TemporaryDirectory(dir=self.path) as tmp:
            bundle = Path(tmp) / f"{name}-{new_version}.bundle"
            with bundle.open("wb") as out:
                write_bundle(out, renewed, members)
            return self.add_bundle(bundle, keys, re_release_of=version)

    def read_manifest(self, target_path: str, digest: str) -> Manifest:
        """The manifest of the bundle released as ``target_path`` with sha256 ``digest``."""
        with self._target_file(target_path, digest).open("rb") as source:
            return read_manifest(source)

    def _target_file(self, target_path: str, digest: str) -> Path:
        dirname, _, basename = target_path.rpartition("/")
        return self.targets_dir / dirname / f"{digest}.{basename}"


def _short_ids(keyids: list[str]) -> str:
    return ", ".join(keyid[:12] for keyid in keyids) or "none"


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    length = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
    return digest.hexdigest(), length


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
