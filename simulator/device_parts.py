"""The installer's parts for many simulated devices in one process, and the device faults.

The real agent gives its :class:`~agent.ota.installer.Installer` parts sized
for one device: a fetcher in a child process (python-tuf out of the serving
process) and one interpreter per slot. A thousand devices in one process on
a small machine cannot afford a child process per check nor an interpreter
per device, so a simulated device gets:

- :class:`ThreadFetcher`: the child fetcher's own functions
  (:func:`agent.ota.fetch_worker.run`) called in a worker thread, with real
  python-tuf verification and real HTTP, at most ``limit`` at once in the
  process (:class:`FetchSlots`);
- :class:`SharedModels`: the slots' models loaded through :class:`SharedRuntime`,
  one interpreter per distinct model file (by sha256) in the process; the
  self-test (contract, golden vectors, latency, memory) still runs on it;
- :class:`SimSlots`: the real A/B :class:`~agent.ota.slots.Slots`, whose writes
  fail with ``ENOSPC`` while the device's disk is full;
- :class:`SimFaults`: what the runner sets on a device at any moment — a power
  cut at an install step (:class:`PowerCut` raised there), a full disk, a
  clock offset, lost or duplicated desired-state pushes.

:class:`Busy` counts the blocking work of a device under way in threads: a
device that lost its power waits for it to end before it boots again, so two
lives never write the same slot at once.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from agent.config import AgentConfig
from agent.ota import fetch_worker
from agent.ota.answers import FetchAnswer, Unavailable
from agent.ota.journal import Journal
from agent.ota.journal_store import JournalStore
from agent.ota.parts import SlotModel
from agent.ota.selftest import SelfTestReport, self_test
from agent.ota.slots import Slots
from agent.telemetry import Outbox
from model_runtime import LoadedModel, Runtime
from protocol.manifest import Manifest
from simulator.scenario import INSTALL_STEPS

DesiredFault = Literal["normal", "lost", "duplicate"]
DESIRED_FAULTS: tuple[str, ...] = get_args(DesiredFault)
FETCHES_AT_ONCE = 8


class PowerCut(BaseException):
    """The device's power went at ``step`` (or at once): nothing after it runs.

    A ``BaseException``: no ``except Exception`` on the way up (a failing
    update check, a listener) may carry on as if the device were still running.
    """

    def __init__(self, step: str) -> None:
        super().__init__(f"power cut at {step}")
        self.step = step


class SimFaults:
    """A device's faults, settable at any moment (:data:`agent.ota.parts.FaultPoints` too).

    ``power_cut_at`` is an install step of :data:`simulator.scenario.INSTALL_STEPS`:
    the next time the installer reaches it the power goes (once; the setting is
    cleared). ``disk_full``: writes to the outbox and the slots fail with
    ``ENOSPC``. ``clock_offset_s``: the device's clock is ``time.time()`` plus
    it. ``desired``: a share ``desired_share`` of the desired-state pushes is
    lost, or comes twice.
    """

    def __init__(self) -> None:
        self._power_cut_at: str | None = None
        self.disk_full = False
        self.clock_offset_s = 0.0
        self._desired: DesiredFault = "normal"
        self._desired_share = 1.0

    @property
    def power_cut_at(self) -> str | None:
        return self._power_cut_at

    @power_cut_at.setter
    def power_cut_at(self, step: str | None) -> None:
        if step is not None and step not in INSTALL_STEPS:
            raise ValueError(
                f"power_cut_at: no install step {step!r}; known: {', '.join(INSTALL_STEPS)}"
            )
        self._power_cut_at = step

    @property
    def desired(self) -> DesiredFault:
        return self._desired

    @desired.setter
    def desired(self, mode: DesiredFault) -> None:
        if mode not in DESIRED_FAULTS:
            raise ValueError(f"desired: no mode {mode!r}; known: {', '.join(DESIRED_FAULTS)}")
        self._desired = mode

    @property
    def desired_share(self) -> float:
        return self._desired_share

    @desired_share.setter
    def desired_share(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"desired_share: {share!r} is not a share between 0 and 1")
        self._desired_share = share

    def hold(self, step: str) -> None:
        """The installer reached ``step``: the power goes here if it was set to."""
        if step != self._power_cut_at:
            return
        self._power_cut_at = None  # the device comes back with the setting spent
        raise PowerCut(step)

    def full_disk(self, what: str) -> OSError:
        """The error a write to ``what`` gets while the disk is full."""
        return OSError(errno.ENOSPC, f"No space left on device (simulated): {what}")


class Busy:
    """How much of a device's blocking work is under way in threads; waits for none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @contextmanager
    def working(self) -> Iterator[None]:
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1

    @property
    def count(self) -> int:
        return self._count

    async def idle(self, poll_s: float = 0.01) -> None:
        """Return once no blocking work of the device is under way."""
        while self._count:
            await asyncio.sleep(poll_s)


# -- fetching ------------------------------------------------------------------------


class FetchSlots:
    """How many fetches the devices of one process run at once (semaphores per loop).

    A fetch is python-tuf's CPU work (JSON, signatures) a real device does on
    its own CPU; here every device shares the process, and a new assignment
    wakes them all at once. Checks and downloads have ``limit`` slots each: a
    device that found an assignment downloads without queueing behind every
    other device's routine check, as it would on its own CPU.
    """

    def __init__(self, limit: int = FETCHES_AT_ONCE) -> None:
        if limit < 1:
            raise ValueError(f"fetch slots: {limit} is not a positive number of fetches")
        self.limit = limit
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore]
        ] = weakref.WeakKeyDictionary()
        self.in_flight = 0
        self.fetches = 0

    def semaphore(self, command: str = "check") -> asyncio.Semaphore:
        """The slots of ``command`` (``check`` or ``download``) on the running loop."""
        by_command = self._by_loop.setdefault(asyncio.get_running_loop(), {})
        semaphore = by_command.get(command)
        if semaphore is None:
            semaphore = by_command[command] = asyncio.Semaphore(self.limit)
        return semaphore


PROCESS_FETCH_SLOTS = FetchSlots()
"""The process's fetch slots, unless a device is given its own."""


class ThreadFetcher:
    """The agent's fetcher (:mod:`agent.ota.fetch_worker`) in a worker thread of this process.

    The same functions the child process runs: the director's assignment
    checked against the image repository, the bundle downloaded and verified
    (python-tuf, real HTTP). A fetch that fails unexpectedly is what the child
    exiting would be: ``Unavailable`` (``fetcher-failed``); a :class:`PowerCut`
    at ``download`` goes up to the device.
    """

    def __init__(
        self,
        config: AgentConfig,
        faults: SimFaults,
        *,
        busy: Busy | None = None,
        slots: FetchSlots = PROCESS_FETCH_SLOTS,
    ) -> None:
        self.config = config
        self.faults = faults
        self.busy = busy or Busy()
        self.slots = slots

    async def check(self, installed_counter: int) -> FetchAnswer:
        return await self._fetch("check", installed_counter, None)

    async def download(self, installed_counter: int, expect: str) -> FetchAnswer:
        return await self._fetch("download", installed_counter, expect)

    async def _fetch(self, command: str, installed_counter: int, expect: str | None) -> FetchAnswer:
        slots = self.slots
        async with slots.semaphore(command):
            slots.in_flight += 1
            slots.fetches += 1
            try:
                return await asyncio.to_thread(self._run, command, installed_counter, expect)
            finally:
                slots.in_flight -= 1

    def _run(self, command: str, installed_counter: int, expect: str | None) -> FetchAnswer:
        with self.busy.working():
            try:
                return fetch_worker.run(
                    command, self.config, installed_counter, expect, faults=self.faults
                )
            except Exception as exc:  # the child process would have died of it
                return Unavailable(
                    reason="fetcher-failed",
                    message=f"the update fetcher failed: {type(exc).__name__}: {exc}",
                )


# -- models --------------------------------------------------------------------------


class SharedRuntime:
    """A :class:`Runtime` that loads each distinct model file once per process (by sha256).

    Every device holding the same model file gets the same interpreter; the
    interpreter serialises its runs. A file that does not load is not kept:
    the next device asking gets the runtime's own error again.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.name = f"shared {runtime.name}"
        self._lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self.loads = 0
        """Interpreters made (each distinct model file loaded once)."""
        self.requests = 0
        """Loads asked for, by every device."""

    def load(self, path: Path) -> LoadedModel:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            self.requests += 1
            model = self._models.get(digest)
            if model is None:
                # From the bytes, not the file: a device's slot is rewritten by its next install.
                model = self.runtime.load(data)  # type: ignore[arg-type]
                self._models[digest] = model
                self.loads += 1
            return model

    def interpreters(self) -> dict[str, LoadedModel]:
        """The interpreters held, by the sha256 of their model file."""
        with self._lock:
            return dict(self._models)


_SHARED: dict[int, SharedRuntime] = {}
_SHARED_LOCK = threading.Lock()


def shared_runtime(runtime: Runtime) -> SharedRuntime:
    """The process's :class:`SharedRuntime` over ``runtime`` (one per runtime object)."""
    if isinstance(runtime, SharedRuntime):
        return runtime
    with _SHARED_LOCK:
        shared = _SHARED.get(id(runtime))
        if shared is None or shared.runtime is not runtime:
            shared = _SHARED[id(runtime)] = SharedRuntime(runtime)
        return shared


class SharedModels:
    """:class:`~agent.ota.parts.SlotModels` over :class:`SharedRuntime`: one interpreter per model.

    The self-test is the agent's own (:func:`agent.ota.selftest.self_test`):
    the model loads, its tensors are the manifest's, its golden vectors give
    the expected outputs, latency and memory within budget — on the shared
    interpreter.
    """

    def __init__(self, slots: Slots, runtime: SharedRuntime, busy: Busy | None = None) -> None:
        self.slots = slots
        self.runtime = runtime
        self.busy = busy or Busy()

    def load(self, slot: str) -> SlotModel:
        manifest = self.slots.manifest(slot)
        model = self.runtime.load(self.slots.path(slot) / manifest.model_file)
        return SlotModel(slot, manifest, model)

    def self_test(self, slot: str) -> tuple[SlotModel, SelfTestReport]:
        with self.busy.working():
            manifest = self.slots.manifest(slot)
            model, report = self_test(self.runtime, self.slots.path(slot), manifest)
            return SlotModel(slot, manifest, model), report


# -- storage -------------------------------------------------------------------------


class SimSlots(Slots):
    """The real A/B slots; staging fails with ``ENOSPC`` while the device's disk is full."""

    def __init__(
        self,
        directory: Path,
        faults: SimFaults,
        on_full: Callable[[], None],
        busy: Busy | None = None,
    ) -> None:
        super().__init__(directory)
        self.faults = faults
        self.on_full = on_full
        self.busy = busy or Busy()

    def stage(
        self, slot: str, bundle: Path, on_half_written: Callable[[], None] | None = None
    ) -> Manifest:
        with self.busy.working():
            if self.faults.disk_full:
                self.on_full()
                raise self.faults.full_disk(f"slot {slot}")
            return super().stage(slot, bundle, on_half_written)

    def verify(self, slot: str) -> Manifest:
        with self.busy.working():
            return super().verify(slot)


class SimOutbox(Outbox):
    """The real SQLite outbox; storing a window fails with ``ENOSPC`` while the disk is full.

    Commits are not fsynced (``synchronous=NORMAL``; the WAL still orders
    them): a simulated power cut stops a device, not the machine, so the
    operating system keeps every write, and a thousand devices' fsyncs on one
    disk — the acknowledgements' on the event loop — would be the
    simulation's bottleneck.
    """

    def __init__(
        self, path: Path, faults: SimFaults, on_full: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(path, **kwargs)
        self.faults = faults
        self.on_full = on_full
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def put(self, window_id: str, payload: bytes, created_at: float) -> bool:
        if self.faults.disk_full:
            self.on_full()
            raise self.faults.full_disk(f"outbox {self.path.name}")
        return super().put(window_id, payload, created_at)


class SimJournalStore(JournalStore):
    """The real journal and event log, written without fsync (see :class:`SimOutbox`).

    The journal is still replaced atomically (a new file renamed over the
    old), so a device that boots again reads the old journal or the new one.
    """

    def save(self, journal: Journal) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _replace(self.path, journal.model_dump_json(indent=1).encode())

    def event(self, at: float, kind: str, **fields: object) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.events_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"at": at, "event": kind, **fields}) + "\n")
        self._trim()


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class DeviceSnapshot:
    """What a device looks like from outside at one moment."""

    device_id: str
    online: bool  # its MQTT link is connected
    phase: str  # its install journal's phase
    active_version: str | None
    verified: bool  # an active model that passed its self-test is loaded
    installing: bool  # an install is under way (the journal is not idle)
    booting: bool = False  # starting, or again after a power cut: it serves nothing yet


def device_clock(base: Callable[[], float], faults: SimFaults) -> Callable[[], float]:
    """The device's clock: ``base()`` plus the fault's offset at the moment it is read."""

    def now() -> float:
        return base() + faults.clock_offset_s

    return now


__all__ = [
    "Busy",
    "DeviceSnapshot",
    "FetchSlots",
    "PowerCut",
    "SharedModels",
    "SharedRuntime",
    "SimFaults",
    "SimJournalStore",
    "SimOutbox",
    "SimSlots",
    "ThreadFetcher",
    "device_clock",
    "shared_runtime",
]
