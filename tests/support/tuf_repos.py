"""TUF repositories the project's release tooling never writes, built with ``tuf.api.metadata``.

The release tooling signs sha256 and uses consistent snapshots; a TUF
repository may do neither. These helpers write such repositories with real
signatures from a project :class:`KeyStore`, so the agent is checked against
what the specification allows rather than against what our tooling happens to
produce.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from fleet_server.director import DirectorRepository
from fleet_server.director.repository import assignment_custom
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository, ReleasedBundle, bundle_custom
from protocol.bundle import read_manifest


def file_hashes(path: Path, algorithms: tuple[str, ...]) -> dict[str, str]:
    data = path.read_bytes()
    return {a: hashlib.new(a, data).hexdigest() for a in algorithms}


def _sign(md: Metadata[Any], keys: KeyStore, role: str) -> bytes:
    for signer in keys[role].signers:
        md.sign(signer, append=True)
    return md.to_bytes(JSONSerializer(compact=False))


def plain_repository(
    path: Path,
    keys: KeyStore,
    bundles: list[Path],
    *,
    consistent_snapshot: bool,
    algorithms: tuple[str, ...] = ("sha256",),
) -> Path:
    """Write a TUF repository listing ``bundles``; returns the trusted root's path.

    Without consistent snapshots every file has its plain name
    (``metadata/targets.json``, ``targets/NAME/NAME-VERSION.bundle``); with them,
    metadata is versioned and each target is stored as ``HASH.NAME`` for every
    hash it is signed with.
    """
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=7)
    meta_dir, targets_dir = path / "metadata", path / "targets"
    meta_dir.mkdir(parents=True)
    root = Root(expires=expires, consistent_snapshot=consistent_snapshot)
    for role in ("root", "targets", "snapshot", "timestamp"):
        for key in keys[role].public_keys:
            root.add_key(key, role)
        root.roles[role].threshold = keys[role].threshold
    (meta_dir / "1.root.json").write_bytes(_sign(Metadata(root), keys, "root"))

    targets = Targets(expires=expires)
    for bundle in bundles:
        with bundle.open("rb") as f:
            manifest = read_manifest(f)
        hashes = file_hashes(bundle, algorithms)
        target_path = manifest.target_path
        targets.targets[target_path] = TargetFile(
            length=bundle.stat().st_size,
            hashes=hashes,
            path=target_path,
            unrecognized_fields={"custom": bundle_custom(manifest)},
        )
        dirname, _, basename = target_path.rpartition("/")
        (targets_dir / dirname).mkdir(parents=True, exist_ok=True)
        names = [f"{h}.{basename}" for h in hashes.values()] if consistent_snapshot else [basename]
        for name in names:
            shutil.copyfile(bundle, targets_dir / dirname / name)
    targets_bytes = _sign(Metadata(targets), keys, "targets")
    prefix = "1." if consistent_snapshot else ""
    (meta_dir / f"{prefix}targets.json").write_bytes(targets_bytes)

    snapshot = Snapshot(expires=expires, meta={"targets.json": MetaFile(version=1)})
    snapshot_bytes = _sign(Metadata(snapshot), keys, "snapshot")
    (meta_dir / f"{prefix}snapshot.json").write_bytes(snapshot_bytes)
    timestamp = Timestamp(
        expires=expires,
        snapshot_meta=MetaFile(
            version=1,
            length=len(snapshot_bytes),
            hashes={"sha256": hashlib.sha256(snapshot_bytes).hexdigest()},
        ),
    )
    (meta_dir / "timestamp.json").write_bytes(_sign(Metadata(timestamp), keys, "timestamp"))
    return meta_dir / "1.root.json"


def resign_with_hashes(
    repo: ImageRepository, keys: KeyStore, bundle: Path, algorithms: tuple[str, ...]
) -> dict[str, str]:
    """Re-sign ``bundle``'s entry in ``repo`` with only ``algorithms``; returns its hashes.

    The target file is stored as ``HASH.NAME`` under each of those hashes, as a
    consistent-snapshot repository must.
    """
    with bundle.open("rb") as f:
        manifest = read_manifest(f)
    hashes = file_hashes(bundle, algorithms)
    listed = repo.targets()
    listed[manifest.target_path] = TargetFile(
        length=bundle.stat().st_size,
        hashes=hashes,
        path=manifest.target_path,
        unrecognized_fields={"custom": bundle_custom(manifest)},
    )
    dirname, _, basename = manifest.target_path.rpartition("/")
    folder = repo.targets_dir / dirname
    for old in folder.glob(f"*.{basename}"):
        old.unlink()
    for h in hashes.values():
        shutil.copyfile(bundle, folder / f"{h}.{basename}")
    repo.set_targets(keys, listed)
    return hashes


def assign_with_hashes(
    director: DirectorRepository,
    keys: KeyStore,
    device_id: str,
    hardware_id: str,
    bundle: ReleasedBundle,
    hashes: dict[str, str],
) -> None:
    """Assign ``bundle`` to ``device_id`` with a director entry that lists ``hashes``."""
    director.register(keys, device_id)
    target = TargetFile(
        length=bundle.length,
        hashes=hashes,
        path=bundle.target_path,
        unrecognized_fields={"custom": assignment_custom(device_id, hardware_id, bundle)},
    )
    director.device(device_id).set_targets(keys, {bundle.target_path: target})
