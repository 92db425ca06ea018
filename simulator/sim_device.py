"""A simulated device: the real agent's serving, telemetry, MQTT link and director client.

Many :class:`SimDevice` run in one process and one event loop, each with the
agent's own parts wired as ``edge-agent run`` wires them
(:mod:`agent.daemon`). The device comes with a model installed
(:class:`InstalledModel`, read from a released bundle): with ``install`` on
(the default) it is written into the device's A/B slots as the factory
image, and from then on the real :class:`~agent.ota.installer.Installer`
installs what the director assigns — download and TUF verification, staging,
self-test, switch, trial under the watchdog, commit or rollback — with the
parts of :mod:`simulator.device_parts` (a fetcher in a worker thread, one
interpreter per model file per process). With ``install`` off the device
serves its factory model for good, as before.

- the installer: an update loop (every ``poll_s``, and at once when a desired
  state arrives), the trial clock, the watchdog fed by the chain; its events
  and its journal go out over the MQTT link;
- faults (:class:`~simulator.device_parts.SimFaults`, ``device.faults``): a
  power cut at an install step or now (:meth:`SimDevice.power_cut`), after
  which the device boots again — a new installer over the same data folder,
  ``recover()``, a new MQTT link; a full disk; a clock offset; lost or
  duplicated desired-state pushes (:meth:`SimDevice.snapshot` shows where a
  device is);
- serving: the real :class:`~agent.serving.FallbackChain` over the installed
  model (the TFLite runtime; one interpreter per device without the
  installer), with the real
  :class:`~agent.serving.CloudStage` calling the fleet's cloud endpoint with
  the device's credential;
- the plan: read from the device's own signed director metadata over HTTP by
  the agent's :class:`~agent.ota.director_client.DirectorClient` every
  ``plan_poll_s`` (and at once when the server's desired state changes), and
  handed to the chain (``set_hybrid_plan``); a refused or absent plan means
  local only;
- telemetry: the real :class:`~agent.telemetry.WindowRecorder` (windows of
  ``window_s`` seconds) into the real SQLite :class:`~agent.telemetry.Outbox`,
  published by the real :class:`~agent.mqtt.MqttLink` with the device's MQTT
  credentials on its own topics, and acknowledged by the server.

The device's caller is :meth:`SimDevice.infer` (what the local API would
call); :func:`drive` sends it Poisson traffic. Everything a device saw is
counted in :class:`DeviceStats`, for the assertions of a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import AgentConfig
from agent.mqtt import MqttLink
from agent.ota.director_client import DirectorClient
from agent.ota.image_repository import ImageRepositoryClient
from agent.ota.installer import Installer
from agent.ota.journal import InstallTarget, Journal, Outcome, Phase
from agent.ota.journal_store import JournalStore
from agent.ota.parts import SlotModel
from agent.ota.slots import Slots
from agent.ota.transport import FetchConfig
from agent.serving.chain import Answer, ChainConfig, FallbackChain, ModelSlot
from agent.serving.cloud import CloudStage
from agent.serving.hybrid import AuditResult
from agent.telemetry import WindowPolicy, WindowRecorder, WindowRecordError
from model_runtime import LoadedModel, Runtime
from protocol.bundle import read_bundle
from protocol.hybrid import HybridPlan
from protocol.manifest import Manifest
from protocol.window import WindowSummary, encode_window
from simulator.device_parts import (
    PROCESS_FETCH_SLOTS,
    Busy,
    DeviceSnapshot,
    FetchSlots,
    PowerCut,
    SharedModels,
    SharedRuntime,
    SimFaults,
    SimJournalStore,
    SimOutbox,
    SimSlots,
    ThreadFetcher,
    device_clock,
    shared_runtime,
)

log = logging.getLogger(__name__)
SIM_INLINE_BELOW_S = 1.0

TRIAL_TICK_S = 0.2  # the trial clock while a trial runs (agent.daemon.TICK_S)
TRIAL_TICKS = 60  # ... or a sixtieth of a longer trial: a thousand devices in trial at once
DUPLICATE_AFTER_S = 0.5  # a duplicated desired-state push comes again this much later


@dataclass(frozen=True)
class InstalledModel:
    """The model a simulated device serves: a released bundle's manifest and model bytes.

    ``target`` is the bundle as the image repository signed it (what the
    device reports as its active bundle); ``bundle`` the bundle file itself,
    which a device with an installer writes into its slots as its factory image.
    """

    manifest: Manifest
    model: bytes
    target: InstallTarget
    bundle: bytes | None = None

    @classmethod
    def from_bundle(cls, bundle: bytes, target: InstallTarget) -> InstalledModel:
        """Read a bundle (every member checked against its manifest)."""
        manifest, members = read_bundle(io.BytesIO(bundle))
        return cls(manifest, members[manifest.model_file], target, bundle)


@dataclass(frozen=True)
class SimDeviceConfig:
    """Who the device is, where its fleet is, and its hardware profile.

    ``broker`` and ``server_url`` may point at a fault proxy in front of the
    real ones. ``inference_ms`` is what the device's hardware adds to each
    local inference. ``install`` gives the device the real installer (polling
    every ``poll_s``, and at once on a desired-state push; a new model on
    trial for ``health_period_s``); off, it serves its factory model for good.
    """

    device_id: str
    password: str
    namespace: str  # the deployment's MQTT topic namespace
    hardware_id: str
    server_url: str  # the fleet server: its director and image repository hosting
    broker: str
    director_root: Path  # the director's root.json the device was provisioned with
    repository_root: Path  # the image repository's root.json, likewise
    data_dir: Path
    cloud_url: str | None = None
    window_s: float = 2.0
    plan_poll_s: float = 2.0
    heartbeat_s: float = 5.0
    ack_timeout_s: float = 10.0
    cloud_timeout_s: float = 1.0
    inference_ms: float = 0.0
    poll_s: float = 30.0
    install: bool = True
    health_period_s: float = 10.0
    telemetry_tick_s: float = 0.25


@dataclass
class DeviceStats:
    """What one device's caller saw, and what it did under its plans and installs."""

    requests: int = 0
    answered: int = 0
    failed: list[str] = field(default_factory=list)  # the caller got an exception: never expected
    stages: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    cloud_errors: Counter[str] = field(default_factory=Counter)
    # (monotonic time, correct) of every answer whose label was known.
    correct: int = 0
    labelled: int = 0
    plans: dict[str, HybridPlan] = field(default_factory=dict)  # every plan the device followed
    # (monotonic time, plan id or None) each time the plan handed to the chain changed.
    plan_changes: list[tuple[float, str | None]] = field(default_factory=list)
    plan_refusals: list[str] = field(default_factory=list)
    # Every window the device closed, as it went into the outbox, with when (monotonic).
    windows: list[tuple[float, WindowSummary]] = field(default_factory=list)
    # Monotonic times of the cloud's answers (escalations and audits alike), and their latency.
    cloud_answers: list[float] = field(default_factory=list)
    cloud_latency_s: list[float] = field(default_factory=list)
    # (monotonic time, why) each time the device was asked to serve without a verified model.
    unserved: list[tuple[float, str]] = field(default_factory=list)
    installs: Counter[str] = field(default_factory=Counter)  # outcomes: committed, rolled_back, ...
    reboots: int = 0
    power_cuts: int = 0
    disk_full_errors: int = 0  # writes refused with ENOSPC (outbox and slots)
    desired_pushes: int = 0  # desired states the link received
    desired_lost: int = 0  # of them, dropped by the fault
    desired_duplicated: int = 0  # of them, acted on twice by the fault
    # Closed windows waiting for disk space: stored (and in ``windows``) once there is some.
    windows_waiting: int = 0
    windows_lost: int = 0  # closed windows never stored (the power went while they waited)

    def plan_at(self, at: float) -> str | None:
        """The plan id the device followed at monotonic time ``at``."""
        current = None
        for when, plan_id in self.plan_changes:
            if when > at:
                break
            current = plan_id
        return current


class _Slot:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest


class _Installed:
    """What the MQTT link reports of a device without an installer: its factory model."""

    def __init__(self, installed: InstalledModel) -> None:
        self.journal = Journal(
            installed=installed.target, installed_counter=installed.target.release_counter
        )
        self.active: _Slot | None = _Slot(installed.manifest)
        self.previous: _Slot | None = None


class SimDevice:
    """One device of the simulation; :meth:`run` it as a task, call :meth:`infer`.

    Without an installer (``config.install`` off), ``model`` is the installed
    model already loaded (devices of one simulation may share it); otherwise
    ``runtime`` loads the device's own. With an installer every model is
    loaded through the process's :class:`~simulator.device_parts.SharedRuntime`
    over ``runtime``. ``clock`` is the time base the device's clock adds
    ``faults.clock_offset_s`` to.
    """

    def __init__(
        self,
        config: SimDeviceConfig,
        installed: InstalledModel,
        runtime: Runtime,
        *,
        model: LoadedModel | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.stats = DeviceStats()
        self.faults = SimFaults()
        self.clock = device_clock(clock, self.faults)
        self._counting = threading.Lock()
        self._busy = Busy()
        self._random = random.Random(seed)
        self._seed = seed
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        password_file = data / "password"
        password_file.write_text(config.password)
        password_file.chmod(0o600)
        self.agent_config = self._agent_config(password_file)
        cloud = None
        if config.cloud_url is not None:
            cloud = CloudStage(
                config.cloud_url,
                installed.manifest.name,
                timeout_s=config.cloud_timeout_s,
                username=config.device_id,
                password=config.password,
            )
        slot = None
        self.runtime: SharedRuntime | None = None
        if config.install:
            self.runtime = shared_runtime(runtime)
            self._provision(installed)
        else:
            # A loaded model may be shared by many devices: its runs are serialised by a lock.
            if model is None:  # the device's own copy, as its slot holds it
                model_path = data / installed.manifest.model_file
                model_path.write_bytes(installed.model)
                model = runtime.load(model_path)
            slot = ModelSlot(installed.manifest, model)
        self.chain = FallbackChain(
            slot,
            cloud=cloud,
            # On the loop, always after the first run: the devices of a process share its
            # CPU, so a worker-thread hop buys no responsiveness, and under a thousand
            # devices' load a model timed in a thread stays slower than the agent's
            # threshold and never comes back (its p95 ten times its inline peers').
            config=ChainConfig(max_audits_in_flight=2, inline_below_s=SIM_INLINE_BELOW_S),
            wall_clock=self.clock,
            seed=seed,
        )
        self.recorder = self._new_recorder(None if config.install else installed.manifest)
        self.chain.on_answer(self._record)
        self.chain.on_audit(self._record_audit)
        self.chain.subscribe(self._observe)
        self.outbox = self._new_outbox()
        self._unstored: list[WindowSummary] = []  # closed windows waiting for disk space
        self.wake = asyncio.Event()
        """Set by a desired-state push: the plan is read again at once."""
        self.update_wake = asyncio.Event()
        """Set by a desired-state push: the installer asks the director at once."""
        self._power = asyncio.Event()
        self._up = asyncio.Event()
        self._check_after_trial = False
        self._trial_tick_s = max(TRIAL_TICK_S, config.health_period_s / TRIAL_TICKS)
        self._polled = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the device runs on
        self.refresh_slots: asyncio.Semaphore | None = None
        """Shared by the devices of one process: how many refresh their director at once."""
        self.fetch_slots: FetchSlots = PROCESS_FETCH_SLOTS
        """Shared by the devices of one process: how many installer fetches run at once."""
        self._factory = _Installed(installed)
        self.installer: Installer | None = self._new_installer() if config.install else None
        self._last_outcome: Outcome | None = (
            self.installer.journal.last_outcome if self.installer is not None else None
        )
        self.link = self._new_link()
        metadata = data / "director"
        ImageRepositoryClient.provision(metadata, config.director_root)
        self.director = DirectorClient(
            metadata,
            f"{config.server_url.rstrip('/')}/director",
            config.device_id,
            FetchConfig(
                connect_timeout=5, read_timeout=10, auth=(config.device_id, config.password)
            ),
        )

    # -- how the device is put together -----------------------------------------------

    def _agent_config(self, password_file: Path) -> AgentConfig:
        config = self.config
        server = config.server_url.rstrip("/")
        return AgentConfig.model_validate(
            {
                "device_id": config.device_id,
                "hardware_id": config.hardware_id,
                "data_dir": config.data_dir,
                "image_repository": {"url": f"{server}/repository", "root": config.repository_root},
                "director": {"url": f"{server}/director", "root": config.director_root},
                "server": {"url": config.server_url, "broker": config.broker},
                "credentials": {"username": config.device_id, "password_file": password_file},
                "mqtt": {
                    "namespace": config.namespace,
                    "heartbeat_interval_s": config.heartbeat_s,
                    "reconnect_min_s": 0.5,
                    "reconnect_max_s": 5.0,
                },
                "telemetry": {
                    "window_max_seconds": config.window_s,
                    "ack_timeout_s": config.ack_timeout_s,
                },
                "update": {
                    "poll_interval_s": config.poll_s,
                    "health_period_s": config.health_period_s,
                },
            }
        )

    def _provision(self, installed: InstalledModel) -> None:
        """Write the factory model into slot ``a`` and journal it installed, once per data folder.

        What a device leaves the factory with: its slots and journal, as if the
        installer had committed it.
        """
        data = self.config.data_dir
        store = JournalStore(data)
        slots = Slots(data / "slots")
        if slots.pointer().active is not None:
            return  # provisioned before: the device boots on what its slots hold
        if installed.bundle is None:
            raise ValueError(
                f"{self.device_id}: the installed model has no bundle file to provision the "
                "slots from (use InstalledModel.from_bundle, or install=False)"
            )
        factory = data / "factory.bundle"
        factory.write_bytes(installed.bundle)
        slots.stage("a", factory)
        slots.switch("a")
        factory.unlink()
        store.save(
            Journal(installed=installed.target, installed_counter=installed.target.release_counter)
        )

    def _new_recorder(self, manifest: Manifest | None) -> WindowRecorder:
        config = self.config
        return WindowRecorder(
            manifest,
            config.device_id,
            WindowPolicy(max_seconds=config.window_s, max_requests=100_000),
            clock=self.clock,
            seed=self._seed,
        )

    def _new_outbox(self) -> SimOutbox:
        return SimOutbox(
            self.config.data_dir / "outbox.db", self.faults, self._disk_full, clock=self.clock
        )

    def _new_installer(self) -> Installer:
        """The installer of one boot of the device, over its data folder."""
        assert self.runtime is not None
        data = self.config.data_dir
        slots = SimSlots(data / "slots", self.faults, self._disk_full, self._busy)
        return Installer(
            slots=slots,
            models=SharedModels(slots, self.runtime, self._busy),
            store=SimJournalStore(data),
            fetcher=ThreadFetcher(
                self.agent_config, self.faults, busy=self._busy, slots=self.fetch_slots
            ),
            update=self.agent_config.update,
            publish=self._serve_models,
            clock=self.clock,
            faults=self.faults,
            on_event=self._install_event,
        )

    def _new_link(self) -> MqttLink:
        view = self.installer if self.installer is not None else self._factory
        return MqttLink(
            self.agent_config,
            view,
            self.chain,
            on_desired=self._desired,
            outbox=self.outbox,
            clock=self.clock,
        )

    # -- what the installer and the link call -----------------------------------------

    def _serve_models(self, active: SlotModel | None, previous: SlotModel | None) -> None:
        """The installer's publish: the chain serves these, the recorder summarises for them."""
        self.chain.set_models(
            active=ModelSlot(active.manifest, active.model) if active else None,
            previous=ModelSlot(previous.manifest, previous.model) if previous else None,
        )
        try:  # a new model version starts a new window: summaries never mix versions
            self.recorder.set_manifest(self.chain.manifest)
        except WindowRecordError as exc:
            log.warning("%s: windows not summarised for this model: %s", self.device_id, exc)

    def _observe(self, stage: str, model_version: str | None, ok: bool, reason: str | None) -> None:
        if self.installer is not None:
            self.installer.observe(stage, model_version, ok, reason)

    def _install_event(self, event: dict[str, object]) -> None:
        self.link.record(event)
        assert self.installer is not None
        outcome = self.installer.journal.last_outcome
        if outcome is not None and outcome != self._last_outcome:
            self._last_outcome = outcome
            self.stats.installs[outcome.result] += 1

    def _desired(self, _: object) -> None:
        """A new desired state from the link: read the plan and ask the director now."""
        stats, faults = self.stats, self.faults
        stats.desired_pushes += 1
        mode = faults.desired
        if mode != "normal" and self._random.random() < faults.desired_share:
            if mode == "lost":
                stats.desired_lost += 1
                return
            stats.desired_duplicated += 1
            asyncio.get_running_loop().call_later(DUPLICATE_AFTER_S, self._wake_all)
        self._wake_all()

    def _wake_all(self) -> None:
        self.wake.set()
        self.update_wake.set()

    def _disk_full(self) -> None:
        with self._counting:  # from worker threads
            self.stats.disk_full_errors += 1

    # -- the device's caller -------------------------------------------------

    async def infer(self, row: npt.NDArray[Any], label: int | None = None) -> Answer | None:
        """Answer one request of one row, as the local API would; ``None`` if the chain raised.

        A request arriving while the device boots waits until it is up.
        """
        stats = self.stats
        stats.requests += 1
        if not self._up.is_set() and self.installer is not None:
            await self._up.wait()
        if self.config.inference_ms > 0:
            await asyncio.sleep(self.config.inference_ms / 1000)
        if self.installer is not None and self.installer.active is None:
            stats.unserved.append((time.monotonic(), self._why_unverified()))
        try:
            answer = await self.chain.infer({"features": np.asarray(row, np.float32)[None, :]})
        except Exception as exc:  # every request must be answered: count what was not
            stats.failed.append(f"{type(exc).__name__}: {exc}")
            return None
        stats.answered += 1
        stats.stages[answer.stage] += 1
        route = answer.hybrid
        if route is not None:
            stats.routes[route.route] += 1
            if route.cloud_error is not None:
                stats.cloud_errors[route.cloud_error] += 1
            if route.cloud_latency_s is not None:
                stats.cloud_answers.append(time.monotonic())
                stats.cloud_latency_s.append(route.cloud_latency_s)
        if label is not None:
            stats.labelled += 1
            stats.correct += int(top_class(answer) == label)
        return answer

    @property
    def plan(self) -> HybridPlan | None:
        """The plan the device follows now (``None``: none, or it expired)."""
        return self.chain.hybrid_plan

    def snapshot(self) -> DeviceSnapshot:
        """The device as the runner sees it now."""
        installer = self.installer
        journal = installer.journal if installer is not None else self._factory.journal
        active = installer.active if installer is not None else self._factory.active
        return DeviceSnapshot(
            device_id=self.device_id,
            online=self.link.connected,
            phase=str(journal.phase),
            active_version=active.manifest.version if active is not None else None,
            # Every model in the active slot passed the self-test before the pointer named it.
            verified=active is not None and self._up.is_set(),
            installing=journal.phase is not Phase.IDLE,
            booting=installer is not None and self._loop is not None and not self._up.is_set(),
        )

    def power_cut(self) -> None:
        """Cut the power now: the device stops where it is and boots again.

        May be called from any thread; the cut happens on the device's loop.
        """
        loop = self._loop
        if loop is not None and _running_loop() is not loop:
            loop.call_soon_threadsafe(self._power_went, "now")
        else:
            self._power_went("now")

    def _power_went(self, step: str) -> None:
        self.stats.power_cuts += 1
        log.info("%s: power cut at %s", self.device_id, step)
        self._power.set()

    def _why_unverified(self) -> str:
        assert self.installer is not None
        journal = self.installer.journal
        return f"no active model loaded (journal phase {journal.phase})"

    # -- running -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the device going until ``stop`` is set, booting again after each power cut."""
        self._loop = asyncio.get_running_loop()
        try:
            if self.installer is None:
                self._up.set()
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self.link.run(stop))
                    tasks.create_task(self._telemetry(stop))
                    tasks.create_task(self._plans(stop))
                return
            await self._boot()
            while await self._life(stop):
                await self._reboot()
        finally:
            await self.chain.audits_idle()
            self.outbox.close()

    async def _boot(self) -> None:
        """The installer picks up what the last life left, then the device serves."""
        while True:
            assert self.installer is not None
            try:
                await self.installer.recover()
                break
            except PowerCut as cut:  # the power went again while recovering
                self._power_went(cut.step)
                self._power.clear()
                await self._busy.idle()
                self.stats.reboots += 1
                self.installer = self._new_installer()
        if self.installer.active is None:
            self.stats.unserved.append((time.monotonic(), "booted without an active model"))
        self._up.set()

    async def _reboot(self) -> None:
        """A new life on the same data folder: what was only in memory is gone."""
        self._up.clear()
        self._power.clear()
        self.stats.reboots += 1
        await self._busy.idle()  # the blocking work under way when the power went ends
        self.stats.windows_lost += len(self._unstored)
        self.stats.windows_waiting = 0
        self._unstored = []
        self.outbox.close()
        self.outbox = self._new_outbox()
        self.recorder = self._new_recorder(None)
        self.installer = self._new_installer()
        self._last_outcome = self.installer.journal.last_outcome
        self.link = self._new_link()
        self._check_after_trial = False
        await self._boot()

    async def _life(self, stop: asyncio.Event) -> bool:
        """Run the device's tasks until ``stop`` (``False``) or a power cut (``True``)."""
        life_stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = [
            asyncio.create_task(self.link.run(life_stop)),
            asyncio.create_task(self._telemetry(life_stop)),
            asyncio.create_task(self._plans(life_stop)),
            asyncio.create_task(self._updates(life_stop)),
            asyncio.create_task(self._trial_clock(life_stop)),
        ]
        waiters: list[asyncio.Task[Any]] = [
            asyncio.create_task(stop.wait()),
            asyncio.create_task(self._power.wait()),
        ]
        try:
            await asyncio.wait([*tasks, *waiters], return_when=asyncio.FIRST_COMPLETED)
            if self._power.is_set():
                for task in tasks:  # no goodbye, no last window: the power is gone
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return True
            life_stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError
                ):
                    raise result
            if self.installer is not None:
                self.installer.shutting_down_cleanly()
            return False
        finally:
            for task in [*tasks, *waiters]:
                task.cancel()

    async def _updates(self, stop: asyncio.Event) -> None:
        """The update loop of ``edge-agent run``: poll, install, wait for the next reason to."""
        installer = self.installer
        assert installer is not None
        while not stop.is_set():
            self.update_wake.clear()  # a push arriving during the poll wakes the next one
            poll = asyncio.create_task(installer.poll())
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait([poll, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if not poll.done():  # stopping mid-install: the journal makes it resumable
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll
                return
            self._polled.set()  # a trial may have started: the trial clock looks
            try:
                outcome = poll.result()
                if installer.in_trial and outcome == "trial in progress":
                    self._check_after_trial = True
            except PowerCut as cut:
                self._power_went(cut.step)
                return
            except Exception:  # one bad poll must not stop serving
                log.exception("%s: update check failed", self.device_id)
            await _first_set(stop, self.update_wake, timeout=self.config.poll_s)

    async def _trial_clock(self, stop: asyncio.Event) -> None:
        """Commit a trial once its health period is over; idle while no trial runs.

        Only an update check starts a trial (or a boot, which starts this loop).
        """
        installer = self.installer
        assert installer is not None
        while not stop.is_set():
            installer.tick()
            if self._check_after_trial and not installer.in_trial:
                self._check_after_trial = False
                self.update_wake.set()
            if installer.in_trial:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._trial_tick_s)
            else:  # many devices in one process: no clock while no trial runs
                self._polled.clear()
                await _first_set(stop, self._polled, timeout=None)

    def read_plan(self) -> HybridPlan | None:
        """One refresh of the director metadata: the plan it lists for this device, if any.

        A refused plan is recorded (``stats.plan_refusals``) and is no plan. When
        the director cannot be refreshed the plan of the targets last trusted
        holds, while they and it have not expired. Blocking (python-tuf over
        HTTP): run it in a thread.
        """
        try:
            listing = self.director.plan()
        except Exception as exc:  # unreachable, or refused by TUF: keep what was trusted
            self.stats.plan_refusals.append(f"refresh: {type(exc).__name__}: {exc}")
            listing = self.director.trusted_plan()
        if listing.plan_refusal is not None:
            refusal = listing.plan_refusal
            self.stats.plan_refusals.append(f"{refusal.reason}: {refusal.message}")
        return listing.plan

    async def refresh_plan(self) -> HybridPlan | None:
        """Read the director and hand its plan (or none) to the chain."""
        try:
            if self.refresh_slots is None:
                plan = await asyncio.to_thread(self.read_plan)
            else:
                async with self.refresh_slots:
                    plan = await asyncio.to_thread(self.read_plan)
        except Exception as exc:  # nothing trusted either: local only, and say why
            self.stats.plan_refusals.append(f"{type(exc).__name__}: {exc}")
            plan = None
        if plan is not None:
            self.stats.plans.setdefault(plan.plan_id, plan)
        plan_id = plan.plan_id if plan is not None else None
        changes = self.stats.plan_changes
        if not changes or changes[-1][1] != plan_id:
            changes.append((time.monotonic(), plan_id))
        self.chain.set_hybrid_plan(plan)
        return plan

    async def _plans(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            await self.refresh_plan()
            await _first_set(stop, self.wake, timeout=self.config.plan_poll_s)

    async def _telemetry(self, stop: asyncio.Event) -> None:
        """Closed windows into the outbox, and tell the link (``AgentDaemon._telemetry``).

        A window the full disk refuses waits in memory and is stored once
        there is space again, in order.
        """
        while True:
            stopping = stop.is_set()
            if stopping:
                await self.chain.audits_idle()
                self.recorder.close_window()
            while (window := self.recorder.poll()) is not None:
                self._unstored.append(window)
            stored = await self._store_windows()
            if stored:
                self.link.windows_waiting()
            if stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.telemetry_tick_s)

    async def _store_windows(self) -> int:
        """Store the closed windows waiting, oldest first, until the disk refuses one."""
        stored = 0
        while self._unstored:
            window = self._unstored[0]
            try:
                await asyncio.to_thread(self._store, window)
            except OSError as exc:
                log.debug("%s: window %s waits: %s", self.device_id, window.window_id, exc)
                break
            self._unstored.pop(0)
            stored += 1
        self.stats.windows_waiting = len(self._unstored)
        return stored

    def _store(self, window: WindowSummary) -> None:
        # Counted in the same thread as the write: a power cut cannot come between them.
        with self._busy.working():
            self.outbox.put(window.window_id, encode_window(window), window.end)
            self.stats.windows.append((time.monotonic(), window))

    def _record(self, inputs: dict[str, Any], answer: Answer, seconds: float) -> None:
        try:
            self.recorder.record(
                inputs,
                answer.outputs,
                answer.stage,
                seconds,
                model_version=answer.model_version,
                hybrid=answer.hybrid,
            )
        except WindowRecordError as exc:
            log.debug("%s: not summarised: %s", self.device_id, exc)

    def _record_audit(self, result: AuditResult) -> None:
        if result.cloud_latency_s is not None:
            self.stats.cloud_answers.append(time.monotonic())
            self.stats.cloud_latency_s.append(result.cloud_latency_s)
        try:
            self.recorder.record_audit(result)
        except WindowRecordError as exc:
            log.debug("%s: audit not counted: %s", self.device_id, exc)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _first_set(*events: asyncio.Event, timeout: float | None) -> None:
    """Return when any of ``events`` is set, or after ``timeout`` seconds."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def top_class(answer: Answer) -> int:
    """The class the answer's first row scores highest."""
    scores = next(iter(answer.outputs.values()))
    return int(np.asarray(scores).reshape(scores.shape[0], -1)[0].argmax())


async def drive(
    device: SimDevice,
    rows: npt.NDArray[Any],
    rate: float,
    stop: asyncio.Event,
    *,
    labels: npt.NDArray[Any] | None = None,
    seed: int = 0,
    max_in_flight: int = 64,
) -> None:
    """Poisson requests at ``rate`` a second, rows drawn in turn from ``rows``, until ``stop``.

    Each request runs as its own task (a slow cloud call does not hold up the
    next arrival); at most ``max_in_flight`` are under way, the next waits.
    """
    rng = random.Random(seed)
    slots = asyncio.Semaphore(max_in_flight)
    pending: set[asyncio.Task[Any]] = set()
    i = rng.randrange(len(rows))

    async def one(index: int) -> None:
        try:
            label = int(labels[index]) if labels is not None else None
            await device.infer(rows[index], label)
        finally:
            slots.release()

    next_at = time.monotonic()
    while not stop.is_set():
        next_at += rng.expovariate(rate)
        delay = next_at - time.monotonic()
        if delay < -1.0:  # the loop fell behind: carry on from now, not with a burst
            next_at, delay = time.monotonic(), 0.0
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
        await slots.acquire()
        task = asyncio.create_task(one(i % len(rows)))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
