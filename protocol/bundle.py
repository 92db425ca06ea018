"""The bundle file format: an uncompressed POSIX tar of the manifest and its files.

``manifest.json`` comes first so a reader gets it from the first few kilobytes;
the other members (``model.tflite``, ``golden.npz``) are bound to it by sha256
and length. Writing is deterministic (fixed order, zero mtimes and owners), so
the same inputs give the same bytes and the same TUF hash. These functions read
and write file objects the caller opened; they never touch paths themselves.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, BinaryIO

# Each reader imports its own manifest code: a device that only checks a bundle
# (read_checked_manifest) never loads pydantic, and one that installs a bundle
# (read_bundle, with the models) does not load the check beside them.
if TYPE_CHECKING:
    from pydantic import ValidationError

    from protocol.manifest import FileEntry, Manifest
    from protocol.manifest_check import CheckedManifest

MANIFEST_MEMBER = "manifest.json"
MAX_MANIFEST_BYTES = 8 * 1024 * 1024


class BundleFormatError(ValueError):
    """The bytes are not a well-formed bundle, or a member does not match the manifest."""


def file_entry(data: bytes) -> FileEntry:
    """The manifest entry (hash and length) for a member's bytes."""
    from protocol.manifest import FileEntry

    return FileEntry(sha256=hashlib.sha256(data).hexdigest(), length=len(data))


def manifest_bytes(manifest: Manifest) -> bytes:
    """The canonical JSON of a manifest as stored in a bundle."""
    return manifest.model_dump_json(indent=1).encode() + b"\n"


def write_bundle(out: BinaryIO, manifest: Manifest, members: Mapping[str, bytes]) -> None:
    """Write a bundle; every member must match its entry in ``manifest.files``."""
    if set(members) != set(manifest.files):
        raise BundleFormatError("members and manifest.files name different files")
    for name, data in members.items():
        if file_entry(data) != manifest.files[name]:
            raise BundleFormatError(f"{name} does not match its manifest entry")
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [(MANIFEST_MEMBER, manifest_bytes(manifest)), *sorted(members.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def _open(source: BinaryIO) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=source, mode="r:")
    except tarfile.TarError as exc:
        raise BundleFormatError(f"not a bundle (expected an uncompressed tar): {exc}") from exc


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int) -> bytes:
    if not info.isreg():
        raise BundleFormatError(f"member {info.name!r} is not a regular file")
    if info.size > limit:
        raise BundleFormatError(f"member {info.name!r} is {info.size} bytes, over its limit")
    try:
        extracted = tar.extractfile(info)
        if extracted is None:  # pragma: no cover - isreg() members always extract
            raise BundleFormatError(f"member {info.name!r} cannot be read")
        return extracted.read()
    except tarfile.TarError as exc:
        raise BundleFormatError(f"member {info.name!r} is truncated or corrupt: {exc}") from exc


def _manifest_json(source: BinaryIO) -> bytes:
    tar = _open(source)
    try:
        first = tar.next()
    except tarfile.TarError as exc:
        raise BundleFormatError(f"bundle is truncated or corrupt: {exc}") from exc
    if first is None or first.name != MANIFEST_MEMBER:
        raise BundleFormatError(f"the first member of a bundle must be {MANIFEST_MEMBER}")
    return _read_member(tar, first, MAX_MANIFEST_BYTES)


def read_manifest(source: BinaryIO) -> Manifest:
    """Read and validate the manifest, the bundle's first member."""
    from pydantic import ValidationError

    from protocol.manifest import Manifest

    raw = _manifest_json(source)
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise BundleFormatError(f"manifest is invalid: {_first_error(exc)}") from exc


def read_checked_manifest(source: BinaryIO) -> CheckedManifest:
    """Read and check the manifest without pydantic: accepted and refused as :func:`read_manifest`.

    The refusal names the same field in the same words (``protocol.manifest_check``).
    """
    from protocol.manifest_check import ManifestInvalid, check_manifest_json

    raw = _manifest_json(source)
    try:
        return check_manifest_json(raw)
    except ManifestInvalid as exc:
        raise BundleFormatError(f"manifest is invalid: {exc}") from exc


def read_bundle(source: BinaryIO) -> tuple[Manifest, dict[str, bytes]]:
    """Read a whole bundle and check every member against the manifest.

    Raises ``BundleFormatError`` for an unknown, missing, repeated or altered member.
    """
    manifest = read_manifest(source)
    source.seek(0)
    tar = _open(source)
    members: dict[str, bytes] = {}
    try:
        for info in tar:
            if info.name == MANIFEST_MEMBER:
                continue
            entry = manifest.files.get(info.name)
            if entry is None:
                raise BundleFormatError(f"member {info.name!r} is not listed in the manifest")
            if info.name in members:
                raise BundleFormatError(f"member {info.name!r} appears twice")
            data = _read_member(tar, info, entry.length)
            if file_entry(data) != entry:
                raise BundleFormatError(f"{info.name} does not match the hash in the manifest")
            members[info.name] = data
    except tarfile.TarError as exc:
        raise BundleFormatError(f"bundle is truncated or corrupt: {exc}") from exc
    missing = set(manifest.files) - set(members)
    if missing:
        raise BundleFormatError(f"bundle lacks {', '.join(sorted(missing))}")
    return manifest, members


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "manifest"
    return f"{where}: {err['msg']}"
