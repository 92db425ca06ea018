"""A simulated device: the real agent's serving, telemetry, MQTT link and director client.

Many :class:`SimDevice` run in one process and one event loop, each with the
agent's own parts wired as ``edge-agent run`` wires them
(:mod:`agent.daemon`), only without the installer: the device comes with its
model installed (:class:`InstalledModel`, read from a released bundle).

- serving: the real :class:`~agent.serving.FallbackChain` over the bundle's
  model (the TFLite runtime, one interpreter per device), with the real
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
from agent.ota.journal import InstallTarget, Journal
from agent.ota.transport import FetchConfig
from agent.serving.chain import Answer, ChainConfig, FallbackChain, ModelSlot
from agent.serving.cloud import CloudStage
from agent.serving.hybrid import AuditResult
from agent.telemetry import Outbox, WindowPolicy, WindowRecorder, WindowRecordError
from model_runtime import LoadedModel, Runtime
from protocol.bundle import read_bundle
from protocol.hybrid import HybridPlan
from protocol.manifest import Manifest
from protocol.window import WindowSummary, encode_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstalledModel:
    """The model a simulated device serves: a released bundle's manifest and model bytes.

    ``target`` is the bundle as the image repository signed it (what the
    device reports as its active bundle).
    """

    manifest: Manifest
    model: bytes
    target: InstallTarget

    @classmethod
    def from_bundle(cls, bundle: bytes, target: InstallTarget) -> InstalledModel:
        """Read a bundle (every member checked against its manifest)."""
        manifest, members = read_bundle(io.BytesIO(bundle))
        return cls(manifest, members[manifest.model_file], target)


@dataclass(frozen=True)
class SimDeviceConfig:
    """Who the device is and where its fleet is."""

    device_id: str
    password: str
    namespace: str  # the deployment's MQTT topic namespace
    hardware_id: str
    server_url: str  # the fleet server: its director hosting
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


@dataclass
class DeviceStats:
    """What one device's caller saw, and what it did under its plans."""

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
    """What the MQTT link reports of an installer: the model installed, nothing under way."""

    def __init__(self, installed: InstalledModel) -> None:
        self.journal = Journal(
            installed=installed.target, installed_counter=installed.target.release_counter
        )
        self.active: _Slot | None = _Slot(installed.manifest)
        self.previous: _Slot | None = None


class SimDevice:
    """One device of the simulation; :meth:`run` it as a task, call :meth:`infer`.

    ``model`` is the installed model already loaded (devices of one
    simulation may share it); otherwise ``runtime`` loads the device's own.
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
        self._clock = clock
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        password_file = data / "password"
        password_file.write_text(config.password)
        password_file.chmod(0o600)
        self.agent_config = AgentConfig.model_validate(
            {
                "device_id": config.device_id,
                "hardware_id": config.hardware_id,
                "data_dir": data,
                "image_repository": {
                    "url": f"{config.server_url.rstrip('/')}/repository",
                    "root": config.repository_root,
                },
                "director": {
                    "url": f"{config.server_url.rstrip('/')}/director",
                    "root": config.director_root,
                },
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
            }
        )
        cloud = None
        if config.cloud_url is not None:
            cloud = CloudStage(
                config.cloud_url,
                installed.manifest.name,
                timeout_s=config.cloud_timeout_s,
                username=config.device_id,
                password=config.password,
            )
        # A loaded model may be shared by many devices: its runs are serialised by a lock.
        if model is None:  # the device's own copy, as its slot holds it
            model_path = data / installed.manifest.model_file
            model_path.write_bytes(installed.model)
            model = runtime.load(model_path)
        slot = ModelSlot(installed.manifest, model)
        self.chain = FallbackChain(
            slot, cloud=cloud, config=ChainConfig(max_audits_in_flight=2), seed=seed
        )
        self.recorder = WindowRecorder(
            installed.manifest,
            config.device_id,
            WindowPolicy(max_seconds=config.window_s, max_requests=100_000),
            clock=clock,
            seed=seed,
        )
        self.chain.on_answer(self._record)
        self.chain.on_audit(self._record_audit)
        self.outbox = Outbox(data / "outbox.db")
        self.wake = asyncio.Event()
        self.refresh_slots: asyncio.Semaphore | None = None
        """Shared by the devices of one process: how many refresh their director at once."""
        self.link = MqttLink(
            self.agent_config,
            _Installed(installed),
            self.chain,
            on_desired=lambda _: self.wake.set(),
            outbox=self.outbox,
        )
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

    # -- the device's caller -------------------------------------------------

    async def infer(self, row: npt.NDArray[Any], label: int | None = None) -> Answer | None:
        """Answer one request of one row, as the local API would; ``None`` if the chain raised."""
        stats = self.stats
        stats.requests += 1
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

    # -- running -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the link, the telemetry and the plan going until ``stop`` is set."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.link.run(stop))
                tasks.create_task(self._telemetry(stop))
                tasks.create_task(self._plans(stop))
        finally:
            await self.chain.audits_idle()
            self.outbox.close()

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
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self.wake.wait())]
            try:
                await asyncio.wait(
                    waits, timeout=self.config.plan_poll_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in waits:
                    task.cancel()

    async def _telemetry(self, stop: asyncio.Event) -> None:
        """Closed windows into the outbox, and tell the link (``AgentDaemon._telemetry``)."""
        while True:
            stopping = stop.is_set()
            if stopping:
                await self.chain.audits_idle()
                self.recorder.close_window()
            stored = False
            while (window := self.recorder.poll()) is not None:
                await asyncio.to_thread(
                    self.outbox.put, window.window_id, encode_window(window), window.end
                )
                self.stats.windows.append((time.monotonic(), window))
                stored = True
            if stored:
                self.link.windows_waiting()
            if stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

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
