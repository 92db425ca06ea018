"""The rules of publishing, over plain data: refused paths, and a release row <-> its bundle.

No database here; :func:`check_push` only reads the repository folder it is
given, so it is tested with a temporary folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path, PurePosixPath

from fleet_server.db.models import Release
from fleet_server.errors import Conflict, Invalid, NotFound
from fleet_server.release.repository import ReleasedBundle

_VERSIONED_METADATA = re.compile(r"metadata/\d+\.[a-z]+\.json")


class ReleaseError(Invalid):
    """A pushed release is refused; the message says why."""


class PushConflict(Conflict, ReleaseError):
    """Pushed files clash with the files the repository already holds."""


class ReleaseNotFound(NotFound, ReleaseError):
    """No release goes by the name or target path given."""


def safe_relative(path: str) -> PurePosixPath:
    """``path`` if it names a file under ``metadata/`` or ``targets/``, else refused."""
    p = PurePosixPath(path)
    if (
        p.is_absolute()
        or ".." in p.parts
        or not p.parts
        or p.parts[0] not in ("metadata", "targets")
    ):
        raise ReleaseError(f"{path!r} is not a path under metadata/ or targets/")
    return p


def check_push(repository: Path, files: Mapping[str, bytes]) -> None:
    """Refuse pushed paths that would clash with the repository's files.

    A path may not be both a file and a directory, and versioned metadata
    (``N.root.json``, ``N.targets.json``, …) never changes once published:
    a device that has seen version N must never find different bytes there.
    """
    for rel, data in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files or (repository / prefix).is_file():
                raise PushConflict(f"files: {prefix} is a file, so {rel} cannot be under it")
        dest = repository / rel
        if dest.is_dir():
            raise PushConflict(f"files: {rel} is a directory on the server")
        if _VERSIONED_METADATA.fullmatch(rel) and dest.is_file() and dest.read_bytes() != data:
            raise PushConflict(
                f"files: {rel} differs from the published one; versioned metadata never "
                "changes (sign a new version instead)"
            )


def release_row(bundle: ReleasedBundle, released_at: datetime) -> Release:
    """The ``releases`` row recording ``bundle``, released at ``released_at``."""
    return Release(
        target_path=bundle.target_path,
        name=bundle.name,
        version=bundle.version,
        release_counter=bundle.release_counter,
        hardware_ids=list(bundle.hardware_ids),
        sha256=bundle.sha256,
        length=bundle.length,
        released_at=released_at,
    )


def released_bundle(row: Release) -> ReleasedBundle:
    """The bundle a ``releases`` row records (the inverse of :func:`release_row`)."""
    return ReleasedBundle(
        row.target_path,
        row.name,
        row.version,
        row.release_counter,
        tuple(row.hardware_ids),
        row.sha256,
        row.length,
    )
