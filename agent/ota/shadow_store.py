"""The shadow bundle's folder on the device, written whole or not at all.

``DATA_DIR/shadow/current`` holds the shadow bundle (manifest, model, golden
vectors, and ``target.json``, the signed description it was verified
against). It is written to ``shadow/.staging`` first, every file fsynced;
the old shadow is renamed out of the way (``shadow/.old``) and the staging
folder renamed into place, each rename made durable by a folder fsync. A
power cut at any moment leaves the old shadow, the new one or none in
``current`` — never half of one; what it leaves in ``.staging`` or ``.old``
is removed at the next start, and ``current`` is checked file by file against
its manifest before its model is loaded. ``DATA_DIR/shadow/refused.json``
names the last bundle refused for itself (its self-test, its budget, its
signed bytes), replaced atomically, so a restart does not try it again. None
of it touches the A/B slots or the install journal.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import ValidationError

from agent.ota.durable import atomic_write, fsync_dir
from agent.ota.journal import InstallTarget
from agent.ota.slots import MANIFEST_FILE
from protocol.manifest import Manifest

log = logging.getLogger(__name__)

TARGET_FILE = "target.json"
REFUSED_FILE = "refused.json"


class ShadowStoreError(Exception):
    """The shadow folder is missing, damaged, or a bundle cannot be written into it."""


class ShadowStore:
    """The shadow bundle under ``directory`` (``DATA_DIR/shadow``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.current = directory / "current"
        self._staging = directory / ".staging"
        self._old = directory / ".old"
        self._refused = directory / REFUSED_FILE

    def discard_leftovers(self) -> None:
        """Remove what a power cut mid-write left beside ``current``."""
        for leftover in (self._staging, self._old):
            if leftover.exists():
                shutil.rmtree(leftover)

    def install(
        self, bundle: Path, target: InstallTarget, on_half_written: Callable[[], None] | None = None
    ) -> Manifest:
        """Write ``bundle`` as the shadow, replacing the one held; returns its manifest.

        ``on_half_written`` is called halfway through writing the model (crash tests).
        Raises :class:`ShadowStoreError` for a bundle that does not read, ``OSError``
        when the storage fails.
        """
        from protocol.bundle import BundleFormatError, read_bundle  # only while installing

        try:
            with bundle.open("rb") as f:
                manifest, members = read_bundle(f)
        except BundleFormatError as exc:
            raise ShadowStoreError(f"{bundle.name}: {exc}") from None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.discard_leftovers()
        self._staging.mkdir()
        for name, data in [
            (MANIFEST_FILE, manifest.model_dump_json().encode()),
            (TARGET_FILE, target.model_dump_json().encode()),
            *sorted(members.items()),
        ]:
            with (self._staging / name).open("wb") as out:
                if name == manifest.model_file and on_half_written is not None:
                    out.write(data[: len(data) // 2])
                    out.flush()
                    on_half_written()
                    out.write(data[len(data) // 2 :])
                else:
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
        fsync_dir(self._staging)
        if self.current.exists():
            os.replace(self.current, self._old)
        os.replace(self._staging, self.current)
        fsync_dir(self.directory)
        if self._old.exists():
            shutil.rmtree(self._old)
        return manifest

    def remove(self) -> None:
        """Delete the shadow: renamed away first, so a power cut never leaves half of it."""
        if self.current.exists():
            self.discard_leftovers()
            os.replace(self.current, self._old)
            fsync_dir(self.directory)
            shutil.rmtree(self._old)

    def remember_refusal(self, bundle_id: str, details: Mapping[str, object]) -> None:
        """Write down, atomically, that ``bundle_id`` was refused for itself (``details``: why)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {**details, "bundle_id": bundle_id}
        atomic_write(self._refused, json.dumps(record, sort_keys=True).encode())

    def forget_refusal(self) -> None:
        """Forget the refused bundle (the director lists another, or none)."""
        if self._refused.exists():
            self._refused.unlink()
            fsync_dir(self.directory)

    def refusal(self) -> str | None:
        """The bundle id last refused for itself, or ``None``.

        An unreadable record is removed: the bundle is then tried once more.
        """
        record = self.refusal_record()
        return str(record["bundle_id"]) if record is not None else None

    def refusal_record(self) -> dict[str, object] | None:
        """The refused bundle's record (``bundle_id``, ``bundle``, ``reason``, ``message``)."""
        try:
            record = json.loads(self._refused.read_bytes())
            if not isinstance(record, dict) or not isinstance(record.get("bundle_id"), str):
                raise ValueError("no bundle_id")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("shadow: removing an unreadable %s: %s", REFUSED_FILE, exc)
            self._refused.unlink(missing_ok=True)
            return None
        return record

    def manifest(self) -> Manifest:
        try:
            return Manifest.model_validate_json((self.current / MANIFEST_FILE).read_bytes())
        except FileNotFoundError:
            raise ShadowStoreError("no shadow is installed") from None
        except ValidationError as exc:
            raise ShadowStoreError(f"the shadow's manifest is invalid: {exc}") from None

    def held(self) -> InstallTarget | None:
        """The shadow ``current`` holds whole, checked file by file; ``None`` if none.

        A damaged shadow (outside damage: writes are atomic) is removed.
        """
        if not self.current.exists():
            return None
        try:
            return self._verified()
        except (ShadowStoreError, OSError, ValidationError) as exc:
            log.error("shadow: removing a damaged shadow: %s", exc)
            self.remove()
            return None

    def _verified(self) -> InstallTarget:
        from protocol.bundle import file_entry  # the hashing helper belongs with the reader

        manifest = self.manifest()
        target = InstallTarget.model_validate_json((self.current / TARGET_FILE).read_bytes())
        signed = (target.name, target.version, target.release_counter)
        if (manifest.name, manifest.version, manifest.release_counter) != signed:
            raise ShadowStoreError(f"the shadow's manifest is not the signed bundle {signed}")
        present = {p.name for p in self.current.iterdir()} - {MANIFEST_FILE, TARGET_FILE}
        if present != set(manifest.files):
            raise ShadowStoreError(f"the shadow holds {sorted(present)}, not its manifest's files")
        for name, entry in sorted(manifest.files.items()):
            if file_entry((self.current / name).read_bytes()) != entry:
                raise ShadowStoreError(f"the shadow's {name} does not match its manifest")
        return target
