"""A/B model slots and the pointer that says which one serves.

``DIR/a`` and ``DIR/b`` each hold a complete bundle (manifest, model, golden
vectors); ``DIR/current.json`` names the active slot and the previous one.
A new bundle is written into the slot that is not active — first to a staging
folder, fsynced, then renamed into place — and only then does the pointer
switch, by ``os.replace`` and a folder fsync. A crash at any moment leaves
the pointer naming a complete slot: the device never runs a half-written model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agent.ota.durable import atomic_write, fsync_dir
from protocol.manifest import Manifest

SLOT_NAMES = ("a", "b")
MANIFEST_FILE = "manifest.json"


class SlotError(Exception):
    """A slot is missing or damaged."""


class SlotPointer(BaseModel):
    """Which slot serves, and which one held the model before it."""

    model_config = ConfigDict(frozen=True)

    active: str | None = None
    previous: str | None = None


class Slots:
    """The A/B slots under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pointer_path = directory / "current.json"

    def pointer(self) -> SlotPointer:
        try:
            return SlotPointer.model_validate_json(self.pointer_path.read_bytes())
        except FileNotFoundError:
            return SlotPointer()

    def _set_pointer(self, pointer: SlotPointer) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.pointer_path, pointer.model_dump_json().encode())

    def inactive(self) -> str:
        """The slot a new bundle goes into."""
        return "b" if self.pointer().active == "a" else "a"

    def path(self, slot: str) -> Path:
        if slot not in SLOT_NAMES:
            raise SlotError(f"no slot {slot!r}")
        return self.directory / slot

    def manifest(self, slot: str) -> Manifest:
        try:
            return Manifest.model_validate_json((self.path(slot) / MANIFEST_FILE).read_bytes())
        except FileNotFoundError:
            raise SlotError(f"slot {slot} holds no bundle") from None

    def model_path(self, slot: str) -> Path:
        return self.path(slot) / self.manifest(slot).model_file

    def stage(
        self, slot: str, bundle: Path, on_half_written: Callable[[], None] | None = None
    ) -> Manifest:
        """Write ``bundle`` into ``slot`` (which must not be active); returns its manifest.

        ``on_half_written`` is called halfway through writing the model (crash tests).
        """
        pointer = self.pointer()
        if slot == pointer.active:
            raise SlotError(f"slot {slot} is active; refusing to overwrite it")
        if slot == pointer.previous:
            # The fallback model is about to be overwritten: stop pointing at it first.
            self._set_pointer(SlotPointer(active=pointer.active, previous=None))
        # Imported here: the tar reader is only needed while installing.
        from protocol.bundle import BundleFormatError, read_bundle

        try:
            with bundle.open("rb") as f:
                manifest, members = read_bundle(f)
        except BundleFormatError as exc:
            raise SlotError(f"{bundle.name}: {exc}") from None
        staging = self.directory / f".{slot}.staging"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for name, data in [
            (MANIFEST_FILE, manifest.model_dump_json().encode()),
            *sorted(members.items()),
        ]:
            with (staging / name).open("wb") as out:
                if name == manifest.model_file and on_half_written is not None:
                    out.write(data[: len(data) // 2])
                    out.flush()
                    on_half_written()
                    out.write(data[len(data) // 2 :])
                else:
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
        fsync_dir(staging)
        target = self.path(slot)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        fsync_dir(self.directory)
        return manifest

    def verify(self, slot: str) -> Manifest:
        """Check every file of ``slot`` against its manifest (hash and length); its manifest.

        Raises :class:`SlotError` naming the first file missing, altered or unlisted.
        """
        manifest = self.manifest(slot)
        # Imported here: the hashing helper belongs with the bundle reader.
        from protocol.bundle import file_entry

        folder = self.path(slot)
        present = {p.name for p in folder.iterdir()} - {MANIFEST_FILE}
        unlisted = present - set(manifest.files)
        if unlisted:
            raise SlotError(f"slot {slot} holds {', '.join(sorted(unlisted))}, not in its manifest")
        for name, entry in sorted(manifest.files.items()):
            try:
                data = (folder / name).read_bytes()
            except FileNotFoundError:
                raise SlotError(f"slot {slot} lacks {name}") from None
            if file_entry(data) != entry:
                raise SlotError(f"slot {slot}: {name} does not match the hash in its manifest")
        return manifest

    def return_to(self, slot: str) -> SlotPointer:
        """Make ``slot`` active with no fallback (a fleet rollback); idempotent."""
        self.manifest(slot)  # refuse to point at an empty slot
        pointer = SlotPointer(active=slot, previous=None)
        self._set_pointer(pointer)
        return pointer

    def discard_staging(self) -> None:
        """Remove what a crash mid-staging left behind."""
        for slot in SLOT_NAMES:
            staging = self.directory / f".{slot}.staging"
            if staging.exists():
                shutil.rmtree(staging)

    def switch(self, slot: str) -> SlotPointer:
        """Make ``slot`` active; the slot active until now becomes the previous one."""
        self.manifest(slot)  # refuse to point at an empty slot
        pointer = SlotPointer(active=slot, previous=self.pointer().active)
        self._set_pointer(pointer)
        return pointer

    def roll_back(self) -> SlotPointer:
        """Make the previous slot active again; the failed slot is no longer a fallback."""
        current = self.pointer()
        if current.previous is None:
            raise SlotError("there is no previous slot to roll back to")
        pointer = SlotPointer(active=current.previous, previous=None)
        self._set_pointer(pointer)
        return pointer
