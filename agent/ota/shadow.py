"""The shadow install's I/O: its folder on disk and the keeper that carries out its rules.

``DATA_DIR/shadow/current`` holds the shadow bundle (manifest, model, golden
vectors, and ``target.json``, the signed description it was verified
against). It is written to ``shadow/.staging`` first, every file fsynced;
the old shadow is renamed out of the way (``shadow/.old``) and the staging
folder renamed into place, each rename made durable by a folder fsync. A
power cut at any moment leaves the old shadow, the new one or none in
``current`` — never half of one; what it leaves in ``.staging`` or ``.old``
is removed at the next start, and ``current`` is checked file by file against
its manifest before its model is loaded. None of it touches the A/B slots or
the install journal. The rules are :mod:`agent.ota.shadow_steps`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from agent.ota import shadow_steps as st
from agent.ota.answers import ShadowAnswer
from agent.ota.durable import fsync_dir
from agent.ota.errors import SelfTestFailed, UpdateRefused
from agent.ota.journal import InstallTarget
from agent.ota.selftest import self_test
from agent.ota.slots import MANIFEST_FILE
from model_runtime import LoadedModel, Runtime
from protocol.manifest import Manifest

log = logging.getLogger(__name__)

TARGET_FILE = "target.json"


class ShadowStoreError(Exception):
    """The shadow folder is missing, damaged, or a bundle cannot be written into it."""


@dataclass(frozen=True)
class ShadowModel:
    """A shadow model loaded and self-tested beside the active model, ready to run."""

    target: InstallTarget
    manifest: Manifest
    model: LoadedModel


class ShadowStore:
    """The shadow bundle under ``directory`` (``DATA_DIR/shadow``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.current = directory / "current"
        self._staging = directory / ".staging"
        self._old = directory / ".old"

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


class ShadowFetcher(Protocol):
    """Asks the director for this device's shadow and downloads it, verified."""

    async def shadow(self, installed_counter: int, known: str | None) -> ShadowAnswer:
        """The shadow's answer; ``known`` is the bundle id not to download again."""
        ...


class Hold(Protocol):
    def hold(self, step: str) -> None: ...


PublishShadow = Callable[[ShadowModel | None], None]
ReportEvent = Callable[[str, dict[str, object]], None]

_AWAITED = (st.WriteShadow, st.TestShadow)


class ShadowKeeper:
    """Carries out :func:`~agent.ota.shadow_steps.decide_shadow`'s effects.

    ``publish`` hands the serving chain the shadow model to run (``None``: stop
    running one); ``report`` records an event; ``installed_counter`` reads the
    installed release counter, below which no shadow is accepted.
    """

    def __init__(
        self,
        *,
        store: ShadowStore,
        runtime: Runtime,
        fetcher: ShadowFetcher,
        publish: PublishShadow,
        report: ReportEvent,
        installed_counter: Callable[[], int],
        faults: Hold | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.fetcher = fetcher
        self.publish = publish
        self.report = report
        self.installed_counter = installed_counter
        self.faults = faults
        self.state = st.ShadowState()
        self.model: ShadowModel | None = None  # the model running, or the one just tested
        self._lock = asyncio.Lock()

    async def recover(self) -> None:
        """Remove what a power cut left half written; self-test a whole shadow before it runs."""
        async with self._lock:
            held = await asyncio.to_thread(self._held)
            await self._handle(st.ShadowStarted(held))

    def _held(self) -> InstallTarget | None:
        if self.store.directory.exists():
            self.store.discard_leftovers()
        return self.store.held()

    async def poll(self) -> st.ShadowPhase:
        """Ask the director for the shadow and carry out what its answer leads to."""
        async with self._lock:
            answer = await self.fetcher.shadow(self.installed_counter(), self.state.known)
            await self._handle(answer)
            return self.state.phase

    async def _handle(self, event: st.ShadowEvent | None) -> None:
        while event is not None:
            self.state, effects = st.decide_shadow(self.state, event)
            event = None
            for effect in effects:
                assert event is None, "only the last effect of a step leads to an event"
                if isinstance(effect, _AWAITED):
                    event = await self._awaited(effect)
                else:
                    self._do(effect)

    def _do(self, effect: st.ShadowEffect) -> None:
        match effect:
            case st.RunShadow():
                assert self.model is not None
                self.publish(self.model)
            case st.DropShadow():
                self.publish(None)
                self.model = None
                self.store.remove()
            case st.ReportShadow():
                self.report(effect.event, dict(effect.details))
            case _:  # pragma: no cover - a new effect without its I/O
                raise AssertionError(f"no I/O for {effect}")

    async def _awaited(self, effect: st.ShadowEffect) -> st.ShadowEvent:
        match effect:
            case st.WriteShadow():
                return await self._write(Path(effect.bundle_file))
            case st.TestShadow():
                return await self._test()
        raise AssertionError(f"{effect} is not awaited")  # pragma: no cover

    async def _write(self, bundle: Path) -> st.ShadowEvent:
        # The old shadow stops running before its folder is replaced.
        self.publish(None)
        self.model = None
        target = self.state.held
        assert target is not None
        faults = self.faults
        halfway = (lambda: faults.hold("shadow-staging")) if faults is not None else None
        try:
            await asyncio.to_thread(self.store.install, bundle, target, halfway)
        except ShadowStoreError as exc:
            return st.ShadowWriteFailed("invalid-bundle", f"cannot install the shadow: {exc}")
        except OSError as exc:
            return st.ShadowWriteFailed("staging-failed", f"cannot install the shadow: {exc}")
        finally:
            bundle.unlink(missing_ok=True)
        return st.ShadowWritten()

    async def _test(self) -> st.ShadowEvent:
        target = self.state.held
        assert target is not None
        try:
            manifest = self.store.manifest()
            model, report = await asyncio.to_thread(
                self_test, self.runtime, self.store.current, manifest
            )
        except (SelfTestFailed, ShadowStoreError) as exc:
            if isinstance(exc, UpdateRefused):
                return st.ShadowTestFailed(exc.reason, exc.detail)
            return st.ShadowTestFailed("invalid-bundle", str(exc))
        self.model = ShadowModel(target, manifest, model)
        return st.ShadowTestPassed(report.latency_p95_ms, report.memory_mb)
