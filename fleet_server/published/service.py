"""Publishing releases: pushed image repository files, verified, served and indexed.

The server never holds the offline release keys. A release engineer signs a
release into their copy of the repository (``fleetctl release add``) and
pushes the new files; the server stages them, verifies the new metadata with
python-tuf against the root it already trusts — exactly as a device will —
checks every new target against its signed hash, and only then publishes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit import record
from fleet_server.db.models import Release
from fleet_server.published import store
from fleet_server.published.rules import (
    ReleaseError,
    ReleaseNotFound,
    release_row,
    safe_relative,
)
from fleet_server.release.repository import ImageRepository, ReleasedBundle
from fleet_server.release.verify import RepositoryVerificationError, verify_metadata


async def find_release(session: Any, release: str) -> Release:
    """A release by ``NAME@VERSION`` or by target path; refused if there is none."""
    row = await store.release_named(session, release)
    if row is None:
        raise ReleaseNotFound(f"no release {release}; push it first (fleetctl release push)")
    return row


def verify_repository(
    directory: Path, trusted_root: Path, trust_dir: Path | None = None
) -> list[ReleasedBundle]:
    """Verify a whole repository as a device would; returns its bundles (blocking)."""
    try:
        bundles = verify_metadata(directory, trusted_root, trust_dir)
    except RepositoryVerificationError as exc:
        raise ReleaseError(f"the pushed metadata does not verify: {exc}") from None
    for b in bundles:
        dirname, _, basename = b.target_path.rpartition("/")
        file = directory / "targets" / dirname / f"{b.sha256}.{basename}"
        if not file.is_file():
            raise ReleaseError(f"the target file of {b.target_path} is missing")
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if digest != b.sha256 or file.stat().st_size != b.length:
            raise ReleaseError(f"{b.target_path} does not match its signed hash and length")
    return bundles


class ReleaseService:
    """Publishes pushed releases and keeps the ``releases`` table in step."""

    def __init__(self, repository: Path, trust_dir: Path | None = None) -> None:
        self.repository = ImageRepository(repository)
        # The metadata the server accepted last: a push older than it is a rollback.
        self.trust_dir = trust_dir or repository.with_name(repository.name + "-trust")
        self._lock = asyncio.Lock()

    async def index(self, session: AsyncSession) -> list[Release]:
        """Record every bundle the repository lists (idempotent)."""
        bundles = await asyncio.to_thread(self.repository.bundles)
        known = await store.known_target_paths(session)
        added = []
        for b in bundles:
            if b.target_path in known:
                continue
            row = release_row(b, datetime.now(UTC))
            session.add(row)
            added.append(row)
        await session.flush()
        return added

    async def publish(
        self, session: AsyncSession, files: dict[str, bytes], actor: str
    ) -> list[Release]:
        """Verify pushed repository files and publish them; returns the new releases."""
        paths = {str(safe_relative(p)): data for p, data in files.items()}
        async with self._lock:
            await asyncio.to_thread(self._stage_and_swap, paths)
            rows = await self.index(session)
            # A re-release (an old model above the current counter) says which version it is.
            re_releases = {
                b.target_path: b.re_release_of
                for b in await asyncio.to_thread(self.repository.bundles)
                if b.re_release_of is not None
            }
            for row in rows:
                details = {
                    "version": row.version,
                    "release_counter": row.release_counter,
                    "sha256": row.sha256,
                    "hardware_ids": row.hardware_ids,
                }
                if row.target_path in re_releases:
                    details["re_release_of"] = re_releases[row.target_path]
                await record(session, actor, "release.publish", row.target_path, details)
            return rows

    def _stage_and_swap(self, files: dict[str, bytes]) -> None:
        repo = self.repository
        if not repo.exists():
            if "metadata/1.root.json" not in files:
                raise ReleaseError("the server holds no repository yet: push metadata/1.root.json")
            trusted_root = None
        else:
            trusted_root = repo.trusted_root_path
        for rel, data in files.items():
            existing = repo.path / rel
            if existing.is_dir():
                raise ReleaseError(f"{rel} is a folder on the server")
            if (
                rel.startswith("metadata/")
                and not rel.endswith("/timestamp.json")
                and existing.is_file()
                and existing.read_bytes() != data
            ):
                raise ReleaseError(
                    f"{rel} is already published with other content; published metadata "
                    "never changes (sign a new version instead)"
                )
        parent = repo.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
        try:
            if repo.exists():
                shutil.copytree(
                    repo.path, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock")
                )
            for rel, data in files.items():
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            root = trusted_root or staging / "metadata" / "1.root.json"
            verify_repository(staging, root, self.trust_dir)
            # Swap in: new target files first, metadata last (timestamp.json at the very end),
            # so a device never sees metadata that names a file not yet there.
            for rel in sorted(
                files, key=lambda r: (r.startswith("metadata"), r.endswith("timestamp.json"))
            ):
                dest = repo.path / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.tmp")
                tmp.write_bytes(files[rel])
                tmp.replace(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
