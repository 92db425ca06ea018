"""The installer's parts, each behind a small interface, and the real ones.

The :class:`~agent.ota.installer.Installer` is given its slots, model loader,
journal store, fetcher, clock and fault points; a device builds the real ones
from its configuration (:meth:`Installer.from_config`), a test or a simulator
of many devices passes its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.ota.answers import (
    FetchAnswer,
    PlanAnswer,
    ShadowAnswer,
    Unavailable,
    parse_answer,
    parse_plan_answer,
    parse_shadow_answer,
)
from agent.ota.journal import Journal
from agent.ota.selftest import SelfTestReport, self_test
from agent.ota.slots import SlotPointer, Slots
from model_runtime import LoadedModel, Runtime
from protocol.manifest import Manifest


@dataclass(frozen=True)
class SlotModel:
    """A model loaded from a slot, ready to serve."""

    slot: str
    manifest: Manifest
    model: LoadedModel


class SlotStore(Protocol):
    """The A/B slots and the pointer that says which one serves (:class:`Slots`)."""

    def pointer(self) -> SlotPointer: ...

    def inactive(self) -> str: ...

    def stage(
        self, slot: str, bundle: Path, on_half_written: Callable[[], None] | None = None
    ) -> Manifest:
        """Write the bundle file into ``slot``; raises ``SlotError`` or ``OSError``."""
        ...

    def discard_staging(self) -> None: ...

    def verify(self, slot: str) -> Manifest:
        """Check the slot's files against its manifest; raises ``SlotError``."""
        ...

    def return_to(self, slot: str) -> SlotPointer:
        """Make ``slot`` active with no fallback (a fleet rollback)."""
        ...

    def switch(self, slot: str) -> SlotPointer: ...

    def roll_back(self) -> SlotPointer:
        """Make the previous slot active; raises ``SlotError`` when there is none."""
        ...


class SlotModels(Protocol):
    """Loads the model a slot holds, and self-tests it before it may serve."""

    def load(self, slot: str) -> SlotModel:
        """Raises ``SlotError`` or ``ModelLoadError``."""
        ...

    def self_test(self, slot: str) -> tuple[SlotModel, SelfTestReport]:
        """Raises ``SelfTestFailed`` (with the reason) or ``SlotError``."""
        ...


class JournalKeeper(Protocol):
    """Keeps the journal (fsynced on every save) and the install events."""

    def load(self) -> Journal: ...

    def save(self, journal: Journal) -> None: ...

    def event(self, at: float, kind: str, **fields: object) -> None: ...

    def events(self, last: int = 20) -> list[dict[str, object]]: ...


class Fetcher(Protocol):
    """Asks the director (or the image repository) and downloads verified bundles."""

    async def check(self, installed_counter: int) -> FetchAnswer: ...

    async def download(self, installed_counter: int, expect: str) -> FetchAnswer:
        """Download the bundle whose id is ``expect``, if the director still names it."""
        ...


class FaultPoints(Protocol):
    """Named steps a crash test may hold the agent at (:class:`~agent.ota.faults.Faults`)."""

    def hold(self, step: str) -> None: ...


class RuntimeSlotModels:
    """Models loaded from :class:`Slots` with a :class:`Runtime`."""

    def __init__(self, slots: Slots, runtime: Runtime) -> None:
        self.slots = slots
        self.runtime = runtime

    def load(self, slot: str) -> SlotModel:
        manifest = self.slots.manifest(slot)
        return SlotModel(
            slot, manifest, self.runtime.load(self.slots.path(slot) / manifest.model_file)
        )

    def self_test(self, slot: str) -> tuple[SlotModel, SelfTestReport]:
        manifest = self.slots.manifest(slot)
        model, report = self_test(self.runtime, self.slots.path(slot), manifest)
        return SlotModel(slot, manifest, model), report


class ProcessFetcher:
    """The fetcher as a short-lived child process (:mod:`agent.ota.fetch_worker`).

    TUF, urllib3 and the cryptography libraries stay out of the serving process.
    The agent asks it through :class:`~agent.ota.poll_gate.PollGate`, which
    spares the child while the repositories' metadata is unchanged.
    """

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path

    async def check(self, installed_counter: int) -> FetchAnswer:
        return await self._run("check", installed_counter)

    async def download(self, installed_counter: int, expect: str) -> FetchAnswer:
        return await self._run("download", installed_counter, "--expect", expect)

    async def shadow(self, installed_counter: int, known: Collection[str]) -> ShadowAnswer:
        """The director's shadow for this device (:func:`agent.ota.fetch_worker.run_shadow`)."""
        extra = [arg for bundle_id in known for arg in ("--have", bundle_id)]
        line, status = await self._output("shadow", installed_counter, *extra)
        try:
            return parse_shadow_answer(line)
        except ValueError:
            return _fetcher_failed(status)

    async def plan(self) -> PlanAnswer:
        """The director's hybrid plan for this device (:func:`agent.ota.fetch_worker.run_plan`)."""
        line, status = await self._output("plan", 0)
        try:
            return parse_plan_answer(line)
        except ValueError:
            return _fetcher_failed(status)

    async def _run(self, command: str, installed_counter: int, *extra: str) -> FetchAnswer:
        line, status = await self._output(command, installed_counter, *extra)
        try:
            return parse_answer(line)
        except ValueError:
            return _fetcher_failed(status)

    async def _output(
        self, command: str, installed_counter: int, *extra: str
    ) -> tuple[str, int | None]:
        """The last line the fetcher printed (empty if none), and its exit status."""
        # No preexec_fn: Python code between fork and exec can deadlock in a process
        # with threads; the child ties its life to ours itself (--parent).
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.ota.fetch_worker",
            command,
            "--config",
            str(self.config_path),
            "--installed-counter",
            str(installed_counter),
            "--parent",
            str(os.getpid()),
            *extra,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            out, _ = await process.communicate()
        except asyncio.CancelledError:  # the agent is stopping: the fetch is resumable
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        lines = out.decode(errors="replace").strip().splitlines()
        return (lines[-1] if lines else ""), process.returncode


def _fetcher_failed(status: int | None) -> Unavailable:
    return Unavailable(
        reason="fetcher-failed", message=f"the update fetcher exited with status {status}"
    )
