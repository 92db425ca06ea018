"""``fleet-sim run``: a scenario carried out in real time against a real server and broker.

:func:`run_scenario` starts what the scenario does not give, on zero-setup
defaults: its own broker (:class:`RunBroker`: Mosquitto when installed, else
the embedded one; restartable on the same port, for ``broker-restart``), a
``fleet-server`` process on SQLite in the run's folder, and the cloud endpoint
when ``server.cloud``. It releases the initial model, registers the devices
(many at once), builds a :class:`~simulator.sim_device.SimDevice` for each
(one loaded model per process, shared), drives Poisson traffic per cohort
(inputs from :mod:`firmware_images.datagen`, drifting from a cohort's drift
time on; labels for a share of the windows posted late through the labels
API), carries out the scenario's steps and faults on schedule, samples the
fleet each second (:class:`~simulator.report.Sample`), and at the end makes
the checks (:mod:`simulator.checks`) and returns the
:class:`~simulator.report.RunReport`.

A server given by URL (``--server-url``, with an admin token and the broker it
ingests from) is checked before anything starts (:func:`check_given_server`:
it answers, takes the token as an admin's, holds neither releases nor the
scenario's devices; the broker answers) and again once the devices are up
(it sees them online); the run's devices carry a tag of the run, which its
rollouts select, and their windows are counted through the server's API.

Blocking calls (the server's REST API, SQLite, process starts) run in worker
threads so the devices' event loop keeps its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib
import json
import logging
import multiprocessing
import os
import random
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy.typing as npt
import urllib3
from pydantic import ValidationError

from agent.ota.journal import InstallTarget
from firmware_images.datagen import FieldConditions, generate
from fleet_server.api.client import ApiClient as RestClient
from fleet_server.api.client import ApiClientError
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository, ReleasedBundle
from model_runtime import LoadedModel, default_runtime
from protocol.api.rollouts import RolloutSpec, parse_selector
from protocol.broker_url import parse_broker_url
from simulator.checks import RunRecord, expectations, make_checks
from simulator.hybrid_fleet import REFRESHES_AT_ONCE, CloudProcess, install_target
from simulator.progress import Metrics, ProgressLine
from simulator.proxy import CloudFaultProxy, FaultProxy, LinkFaults
from simulator.report import RunReport, Sample
from simulator.scenario import Cohort, Fault, LinkProfile, Scenario, ScenarioError, Step
from simulator.sim_device import InstalledModel, SimDevice, SimDeviceConfig, drive, top_class
from testbed.api_server import repository_files
from testbed.embedded_broker import BrokerStartError, listening
from testbed.images import make_bundle
from testbed.mosquitto import find_mosquitto
from testbed.server_process import ServerProcess
from testbed.waiting import free_port

log = logging.getLogger(__name__)

MODEL_NAME = "pump-health"
VERSIONS = {"v1": "1.0.0", "v2": "1.1.0", "v3-bad": "1.2.0", "cloud": "1.0.1"}
"""The version each sample model is released as unless a step names one."""
CLOUD_HARDWARE = "cloud"
THREADS = 32  # the devices' loop's worker threads (director refreshes, outboxes)
# The GIL's hand-over interval in a process of devices. Its loop is busy with a thousand
# devices, and a worker thread (a fetch's TUF refresh, an outbox write) waits up to this
# long for the GIL after each blocking call it makes: at Python's 5 ms a fetch, a hundred
# or so such calls, may wait half a second on the loop alone, and installs queue behind it.
SWITCH_INTERVAL_S = 0.001
REGISTER_AT_ONCE = 8  # registrations under way at once
CONNECT_WAIT_S = 60.0  # how long the fleet may take to come online before traffic starts
# On a server given by URL: how long it may take to see the first device online.
SEEN_WAIT_S = 30.0
STORED_COUNTS_PER_S = 20.0  # without a database to read: devices' windows listed a second
SETTLE_S = 30.0  # after the traffic: how long the last windows may take to be stored
# After the traffic and the last windows: how long the server's last decisions the
# scenario expects (a rollout's step, a drift alert, the plans after a capacity cut) may
# take to land on a machine slower than the scenario's clock.
OUTCOMES_WAIT_S = 45.0
DRIFT_INTERVAL_S = 10.0  # a run's own server looks for drift this often when alerts are expected
# A rollout step the server refuses because an earlier rollout of the model is still going
# out to the same devices (409) waits for it, as an operator would, this long at most.
ROLLOUT_BUSY_WAIT_S = 60.0
ROLLOUT_BUSY = "one rollout per model and device at a time"  # the server's 409, in its words
STOP_GRACE_S = 30.0
SHOWN_ERRORS = 3

Hold = Callable[[RunReport, "Deployment"], None]
"""Called when a run's checks are made, its fleet still up; the run ends when it returns."""


# -- the run's own broker ------------------------------------------------------


class RunBroker:
    """The run's own broker on a fixed free port: Mosquitto when installed, else amqtt.

    Unlike :func:`testbed.embedded_broker.broker_for_demo` it can be stopped
    and started again on the same port (``broker-restart``): devices
    reconnect to where they were.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.url = f"mqtt://{self.host}:{self.port}"
        binary = find_mosquitto()
        self.kind = "mosquitto" if binary else "amqtt"
        if binary is not None:
            conf = directory / "mosquitto.conf"
            lines = [f"listener {self.port} {self.host}", "allow_anonymous true"]
            lines += ["persistence false", "log_dest stderr", "max_queued_messages 100000"]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                lines.append("user root")  # as root, Mosquitto would switch to its own user
            conf.write_text("\n".join(lines) + "\n")
            self.command = [binary, "-c", str(conf)]
        else:
            self.command = [sys.executable, "-m", "testbed.embedded_broker"]
            self.command += ["--port", str(self.port)]
        self.log_path = directory / f"{self.kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def shared_subscriptions(self) -> bool:
        return self.kind == "mosquitto"

    def start(self, timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not listening(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BrokerStartError(
                    f"the run's {self.kind} broker did not listen on {self.host}:{self.port} "
                    f"(log: {self.log_path})"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the deployment: server, releases, cloud -----------------------------------


@dataclass
class Deployment:
    """What the run talks to: its servers, release keys and image repository, the cloud."""

    workdir: Path
    broker_url: str
    servers: list[ServerProcess]
    token: str
    keys: KeyStore
    repo: ImageRepository
    hardware: tuple[str, ...]
    external: ServerProcess | None = None
    # On a server given by URL: a tag every device of the run carries, which its rollouts
    # select, so they never reach the server's other devices.
    run_tag: str | None = None
    cloud: CloudProcess | None = None
    releases: dict[str, ReleasedBundle] = field(default_factory=dict)  # by version
    bundles: dict[str, Path] = field(default_factory=dict)  # released, by version
    built: dict[tuple[str, str], Path] = field(default_factory=dict)  # by model and version
    device_versions: list[str] = field(default_factory=list)  # released for devices, in order

    @property
    def latest(self) -> str:
        """``NAME@VERSION`` of the device release made last (what a step means by default)."""
        return f"{MODEL_NAME}@{self.device_versions[-1]}"

    @property
    def server(self) -> ServerProcess:
        return self.servers[0]

    @property
    def database(self) -> Path | None:
        """The SQLite file of a server the run started on its default database."""
        path = self.server.data / "fleet.db"
        return path if self.external is None and path.exists() else None

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """``/api/v1`` + ``path`` as the admin, on the first replica that answers."""
        error: Exception | None = None
        for server in self.servers:
            try:
                return server.api(method, path, self.token, body)
            except Exception as exc:  # a replica killed by a fault: try the next
                error = exc
        assert error is not None
        raise error

    def build(self, model: str, version: str | None = None) -> Path:
        """A bundle of sample ``model`` (built once; the setup builds the steps' ahead)."""
        version = version or VERSIONS[model]
        path = self.built.get((model, version))
        if path is None:
            hardware = (CLOUD_HARDWARE,) if model == "cloud" else self.hardware
            folder = self.workdir / "bundles" / model
            folder.mkdir(parents=True, exist_ok=True)
            path = self.built[model, version] = make_bundle(folder, model, version, hardware)
        return path

    def release(self, model: str, version: str | None = None) -> ReleasedBundle:
        """Add a bundle of sample ``model`` to the repository and push the repository."""
        version = version or VERSIONS[model]
        path = self.build(model, version)
        released = self.repo.add_bundle(path, self.keys)
        self.api("POST", "/releases", {"files": repository_files(self.repo.path)})
        self.releases[version] = released
        self.bundles[version] = path
        if model != "cloud":
            self.device_versions.append(version)
        return released

    def installed(self, version: str) -> InstalledModel:
        return InstalledModel.from_bundle(
            self.bundles[version].read_bytes(), install_target(self.releases[version])
        )

    def close(self) -> None:
        if self.cloud is not None:
            self.cloud.stop()
        for server in self.servers:
            server.stop(STOP_GRACE_S)


def start_deployment(scenario: Scenario, workdir: Path, broker: RunBroker | None) -> Deployment:
    """The servers (or the given one), release keys and repository, the initial release."""
    setup = scenario.server
    broker_url = setup.broker or (broker.url if broker else "")
    tick = str(max(1, round(setup.tick.total_seconds())))
    extra = ["--rollout-interval", tick]
    if broker is not None and not broker.shared_subscriptions:
        extra.append("--no-shared-subscription")
    if setup.cloud:
        extra += ["--plan-interval", "2"]
    if scenario.expect.drift_alerts:
        extra += ["--drift-interval", f"{DRIFT_INTERVAL_S:g}"]
    servers: list[ServerProcess] = []
    external = None
    if setup.url is not None:
        if not setup.token:
            raise ScenarioError("server.url: a server given by URL needs server.token")
        external = ServerProcess(workdir, db_url=None, broker=broker_url, replica_id="external")
        external.url = setup.url.rstrip("/")
        servers.append(external)
        token = setup.token
    else:
        db_url = setup.database or f"sqlite:///{(workdir / 'server' / 'fleet.db').resolve()}"
        for i in range(setup.replicas):
            replica = "server" if i == 0 else f"server-{i + 1}"
            servers.append(
                ServerProcess(
                    workdir, db_url=db_url, broker=broker_url, replica_id=replica, extra_args=extra
                )
            )
        token = ""
    for server in servers:  # registrations and the sampler use it from several threads
        server.http = urllib3.PoolManager(
            maxsize=REGISTER_AT_ONCE,
            retries=False,
            timeout=urllib3.Timeout(connect=5, read=60),
        )
    if external is None:
        servers[0].launch()
    keys = init_keys(workdir / "keys")
    repo = ImageRepository(workdir / "repo")
    repo.create(keys)
    hardware = tuple(dict.fromkeys(h.id for h in scenario.hardware))
    deployment = Deployment(
        workdir, broker_url, servers, token, keys, repo, hardware, external=external
    )
    if external is not None:
        deployment.run_tag = f"fleet-sim-{uuid.uuid4().hex[:12]}"
    # While the server starts: the bundles of the run, so no step builds one mid-run.
    deployment.build(scenario.initial)
    if setup.cloud:
        deployment.build("cloud")
    for step in scenario.steps:
        if step.action == "release" and step.model is not None:
            deployment.build(step.model, step.version)
    if external is None:
        servers[0].wait_ready()
        for replica_process in servers[1:]:
            replica_process.start()
        deployment.token = servers[0].admin_token()
    deployment.release(scenario.initial)
    if setup.cloud:
        deployment.release("cloud")
        deployment.cloud = CloudProcess(
            workdir,
            [
                "--data",
                str(deployment.server.data),
                "--trusted-root",
                str(repo.trusted_root_path),
                "--settings-refresh",
                "0.5",
            ],
        )
    return deployment


# -- the fleet -----------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A device of the run: its cohort and what registration gave it."""

    device_id: str
    cohort: Cohort
    password: str
    namespace: str


def cohort_tags(cohort: Cohort) -> tuple[str | None, list[str]]:
    """A cohort's region (a ``region=…`` tag) and its other tags."""
    region = None
    tags = []
    for tag in cohort.tags:
        key, sep, value = tag.partition("=")
        if sep and key == "region":
            region = value
        else:
            tags.append(tag)
    return region, tags


def register_fleet(scenario: Scenario, deployment: Deployment) -> list[Member]:
    """Register every device of the scenario, :data:`REGISTER_AT_ONCE` at a time."""
    cohorts = {c.name: c for c in scenario.cohorts}

    def register(item: tuple[str, str]) -> Member:
        cohort_name, device_id = item
        cohort = cohorts[cohort_name]
        region, tags = cohort_tags(cohort)
        body: dict[str, Any] = {"device_id": device_id, "hardware_id": cohort.hardware}
        if region:
            body["region"] = region
        body["tags"] = [cohort.name, *tags]
        if deployment.run_tag is not None:
            body["tags"].append(deployment.run_tag)
        created = deployment.api("POST", "/devices", body)
        if cohort.weight is not None:
            deployment.api("PATCH", f"/devices/{device_id}/hybrid", {"weight": cohort.weight})
        return Member(device_id, cohort, created["password"], created["mqtt_namespace"] or "")

    items = [(c, d) for c, ids in scenario.device_ids().items() for d in ids]
    with ThreadPoolExecutor(REGISTER_AT_ONCE) as pool:
        return list(pool.map(register, items))


class Caller:
    """A device's caller as :func:`drive` sees it: each answer's top class kept for labels."""

    def __init__(self, device: SimDevice, keep_labels: bool) -> None:
        self.device = device
        self.keep_labels = keep_labels
        self.predictions: list[tuple[float, int, int]] = []  # (device clock, actual, predicted)

    async def infer(self, row: npt.NDArray[Any], label: int | None = None) -> Any:
        answer = await self.device.infer(row, label)
        if answer is not None and label is not None and self.keep_labels:
            clock = getattr(self.device, "clock", time.time)  # the device's, offset or not
            self.predictions.append((clock(), label, top_class(answer)))
        return answer


@dataclass
class ActiveFault:
    fault: Fault
    targets: list[str]
    undo: Callable[[], Any] | None = None
    groups: set[str] = field(default_factory=set)  # the network groups it is aimed at


# -- the network between the devices and the services --------------------------

NETWORK_FAULTS = ("link-down", "latency", "loss", "bandwidth", "reconnect-storm")
"""Faults carried out by the fault proxy in front of the broker and the server."""
CLOUD_FAULTS = ("cloud-429", "cloud-503", "cloud-slow")


def needs_network(scenario: Scenario) -> bool:
    """Whether the devices reach the services through fault proxies in this scenario.

    Only then: a relay in the devices' own process costs CPU a plain run
    does not need to spend.
    """
    links = any(h.link != LinkProfile() for h in scenario.hardware)
    return links or any(f.kind in NETWORK_FAULTS + CLOUD_FAULTS for f in scenario.faults)


class Network:
    """The fault proxies: one in front of the broker, one in front of the server's HTTP, one
    in front of the cloud; a group (a port on each) per class of devices alike in their link
    and the network faults aimed at them, fixed when the devices are made."""

    def __init__(self, scenario: Scenario, groups: dict[str, str]) -> None:
        self.groups = groups  # device id -> group
        self.profiles = {h.id: h.link for h in scenario.hardware}
        self.hardware_of: dict[str, str] = {}
        self.seed = scenario.seed
        self.mqtt: FaultProxy | None = None
        self.http: FaultProxy | None = None
        self.cloud: CloudFaultProxy | None = None
        self.mqtt_ports: dict[str, int] = {}
        self.http_ports: dict[str, int] = {}
        self.cloud_url: str | None = None

    async def open(self, broker_url: str, server_url: str, cloud_url: str | None) -> None:
        broker = parse_broker_url(broker_url)
        server = urllib3.util.parse_url(server_url)
        assert server.host
        server_port = server.port or (443 if server.scheme == "https" else 80)
        self.mqtt = FaultProxy(broker.host, broker.port, seed=self.seed, name="broker")
        self.http = FaultProxy(server.host, server_port, seed=self.seed + 1, name="server")
        for group in sorted(set(self.groups.values())):
            self.mqtt_ports[group] = await self.mqtt.open(group)
            self.http_ports[group] = await self.http.open(group)
        if cloud_url is not None:
            self.cloud = CloudFaultProxy(cloud_url, seed=self.seed + 2)
            self.cloud_url = await self.cloud.start()

    def broker_for(self, device_id: str) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_ports[self.groups[device_id]]}"

    def server_for(self, device_id: str) -> str:
        return f"http://127.0.0.1:{self.http_ports[self.groups[device_id]]}"

    def apply(self, active: list[ActiveFault]) -> None:
        """Set every group's link to its profile with the active network faults on top."""
        for group in set(self.groups.values()):
            hardware = group.split("~")[0]
            link = self.profiles.get(hardware, LinkProfile())
            down, latency, jitter = False, link.latency_ms, link.jitter_ms
            loss, bandwidth = 0.0, link.bandwidth_kbps
            for a in active:
                if a.fault.kind not in NETWORK_FAULTS or group not in a.groups:
                    continue
                f = a.fault
                down = down or f.kind == "link-down"
                if f.kind == "latency":
                    latency += f.latency_ms or 0.0
                    jitter += f.jitter_ms or 0.0
                if f.kind == "loss":
                    loss = max(loss, f.loss or 0.0)
                if f.kind == "bandwidth" and f.bandwidth_kbps is not None:
                    bandwidth = min(bandwidth or f.bandwidth_kbps, f.bandwidth_kbps)
            faults = LinkFaults(
                down=down,
                latency_ms=latency,
                jitter_ms=jitter,
                loss=min(loss, 0.99),
                bandwidth_kbps=bandwidth,
            )
            assert self.mqtt is not None and self.http is not None
            self.mqtt.set(group, faults)
            self.http.set(group, faults)
        if self.cloud is not None:
            share = {"cloud-429": 0.0, "cloud-503": 0.0}
            slow = 0.0
            for a in active:
                kind = a.fault.kind
                if kind in share:
                    share[kind] = max(share[kind], a.fault.share or 1.0)
                if kind == "cloud-slow":
                    slow = max(slow, a.fault.latency_ms or 0.0)
            self.cloud.set(share_429=share["cloud-429"], share_503=share["cloud-503"], slow_ms=slow)

    def cut(self, groups: set[str]) -> int:
        """Reset the open MQTT connections of ``groups`` at once (a reconnect storm)."""
        assert self.mqtt is not None
        if groups >= set(self.groups.values()):
            return int(self.mqtt.cut())
        return sum(int(self.mqtt.cut(g)) for g in sorted(groups))

    def stats(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        for name, proxy in (("broker", self.mqtt), ("server", self.http)):
            if proxy is not None:
                totals: Counter[str] = Counter()
                for group_stats in proxy.stats().values():
                    totals.update({k: v for k, v in vars(group_stats).items()})
                figures[f"proxy_{name}"] = dict(totals)
        if self.cloud is not None:
            figures["proxy_cloud"] = dict(self.cloud.stats())
        return figures

    async def close(self) -> None:
        for proxy in (self.mqtt, self.http, self.cloud):
            if proxy is not None:
                with contextlib.suppress(Exception):
                    await proxy.close()


def device_groups(scenario: Scenario, targets: list[list[str]]) -> dict[str, str]:
    """Each device's group: its hardware and the network faults aimed at it (``~``-joined)."""
    hardware = {d: c.hardware for c in scenario.cohorts for d in scenario.device_ids()[c.name]}
    aimed: dict[str, list[str]] = {d: [] for d in hardware}
    for n, (fault, devices) in enumerate(zip(scenario.faults, targets, strict=True)):
        if fault.kind in NETWORK_FAULTS:
            for d in devices:
                aimed[d].append(f"f{n}")
    return {d: "~".join([hardware[d], *aimed[d]]) for d in hardware}


@dataclass(frozen=True)
class Wiring:
    """Where each device connects and what it was provisioned with: all a device process
    needs of the run its parent set up."""

    brokers: dict[str, str]  # by device id: the broker, or its group's proxy port
    servers: dict[str, str]  # likewise the server's HTTP
    cloud_url: str | None
    director_root: Path
    repository_root: Path
    initial_bundle: Path
    initial_target: InstallTarget
    api_url: str
    token: str


class ApiClient:
    """The server's REST API as the admin, for a device process (labels)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))

    def __call__(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        r = self.http.request(method, f"{self.url}/api/v1{path}", json=body, headers=headers)
        if not 200 <= r.status < 300:
            raise AssertionError(f"{method} {path}: {r.status} {r.data[:300]!r}")
        return json.loads(r.data)


@dataclass
class Part:
    """A device process of a run split over several (``scenario.processes``)."""

    index: int
    process: Any  # multiprocessing.Process
    conn: Any  # its end of the pipe
    ready: bool = False
    sample: dict[str, Any] | None = None  # the latest it sent
    final: dict[str, Any] | None = None  # its devices' records, after its traffic
    error: str | None = None


def device_part(
    scenario_json: str,
    workdir: str,
    index: int,
    members: list[Member],
    wiring: Wiring,
    conn: Any,
    go: Any,
    release: Any,
) -> None:
    """A device process: its share of the devices, their traffic and device faults.

    It says ``ready`` once its devices are online, starts its traffic when
    ``go`` is set, sends a sample a second and, after its traffic, its
    devices' records; it stops them when ``release`` is set.
    """
    scenario = Scenario.model_validate_json(scenario_json)
    with run_log(Path(workdir) / f"fleet-sim-{index}.log"):
        run = Run(scenario, Path(workdir), progress=None, metrics_port=None)
        run.part_index = index
        run.network = None  # the proxies are the run's process's; the wiring points at them
        run.members = {m.device_id: m for m in members}
        run.api_call = ApiClient(wiring.api_url, wiring.token)
        run.conn = conn
        try:
            with switch_interval(SWITCH_INTERVAL_S):
                asyncio.run(run.part_main(wiring, go, release))
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            raise


# -- the run -------------------------------------------------------------------


class Run:
    """One real-time run of a scenario; :meth:`execute` it once."""

    def __init__(
        self,
        scenario: Scenario,
        workdir: Path,
        *,
        progress: ProgressLine | None,
        metrics_port: int | None,
        hold: Hold | None = None,
    ) -> None:
        self.scenario = scenario
        self.hold = hold
        self._started = time.monotonic()
        self.workdir = workdir
        self.progress = progress
        self.metrics = Metrics(metrics_port) if metrics_port is not None else None
        self.rng = random.Random(scenario.seed)
        self.report = RunReport(
            scenario=scenario.name,
            mode="real",
            seed=scenario.seed,
            devices=scenario.devices,
            started_at=datetime.now(UTC).isoformat(),
            duration_s=scenario.duration.total_seconds(),
        )
        self.broker: RunBroker | None = None
        self.deployment: Deployment | None = None
        self.devices: dict[str, SimDevice] = {}
        self.members: dict[str, Member] = {}
        self.callers: dict[str, Caller] = {}
        self.active: list[ActiveFault] = []
        self.rollouts: list[str] = []
        self.capacity_steps: list[float] = []
        self.unserved: dict[str, list[tuple[float, str]]] = {}
        self.labels_posted = 0
        self.t0 = 0.0
        self._labelled_windows: set[str] = set()
        self._stored_cache = 0
        self._stored_by_device: dict[str, int] = {}  # counted through the API
        self.classes: list[str] = []
        self.fault_targets = [self._targets(f) for f in scenario.faults]
        self.scenario_ids = [d for ids in scenario.device_ids().values() for d in ids]
        self.part_index = 0  # 0: the run's own process; else a device process
        self.parts: list[Part] = []
        self.others: list[list[Member]] = []  # the device processes' members
        self.all_members: list[Member] = []
        self.api_call: Callable[..., Any] | None = None
        self.conn: Any = None  # a device process's pipe to the run's process
        self._release: Any = None
        self._go: Any = None
        self._readers: list[asyncio.Task[None]] = []
        self.network: Network | None = None
        if needs_network(scenario):
            self.network = Network(scenario, device_groups(scenario, self.fault_targets))

    # -- setting up and tearing down ------------------------------------------

    def execute(self) -> RunReport:
        started = self._started = time.monotonic()
        check_runnable(self.scenario)
        given = self.scenario.server.url
        if given is not None:
            check_given_server(self.scenario)
        try:
            if self.scenario.server.broker is None and given is None:
                self.broker = RunBroker(self.workdir / "broker")
                self.broker.start()
            with refused_by(given):
                self.deployment = start_deployment(self.scenario, self.workdir, self.broker)
            self._took("setup_s", started)
            cloud = self.deployment.cloud
            with ThreadPoolExecutor(1) as starting:  # the cloud loads its model meanwhile
                cloud_ready = starting.submit(cloud.start) if cloud is not None else None
                registering = time.monotonic()
                with refused_by(given):
                    members = register_fleet(self.scenario, self.deployment)
                self._took("register_s", registering)
                if cloud_ready is not None:
                    cloud_ready.result()
            if given is not None and not all(m.namespace for m in members):
                raise ScenarioError(
                    f"--server-url {given} has no broker (started without --mqtt): its "
                    "devices could not report to it"
                )
            # Device n runs in process n % processes; process 0 is this one.
            count = self.scenario.processes
            self.all_members = members
            self.members = {m.device_id: m for n, m in enumerate(members) if n % count == 0}
            self.others = [
                [m for n, m in enumerate(members) if n % count == k] for k in range(1, count)
            ]
            self.api_call = self.deployment.api
            with switch_interval(SWITCH_INTERVAL_S):
                try:
                    asyncio.run(self._main())
                except BaseExceptionGroup as group:  # the devices' task group: a refusal in it
                    refusal = group.subgroup(ScenarioError)
                    if refusal is None:
                        raise
                    raise first_leaf(refusal) from None
        finally:
            with contextlib.suppress(Exception):
                if self.deployment is not None:
                    self.deployment.close()
            if self.broker is not None:
                self.broker.stop()
            if self.metrics is not None:
                self.metrics.close()
        self.report.wall_s = round(time.monotonic() - started, 1)
        return self.report

    def _took(self, figure: str, since: float) -> None:
        self.report.figures[figure] = round(time.monotonic() - since, 2)

    def wiring(self) -> Wiring:
        """Where each device connects (straight, or through its group's proxies)."""
        deployment = self.deployment
        assert deployment is not None
        director_root = self.workdir / "director-root.json"
        director_root.write_text(json.dumps(deployment.api("GET", "/director/root")))
        network = self.network
        cloud_url = deployment.cloud.url if deployment.cloud is not None else None
        if network is not None and network.cloud_url is not None:
            cloud_url = network.cloud_url
        ids = [m.device_id for m in self.all_members]
        version = VERSIONS[self.scenario.initial]
        return Wiring(
            brokers={d: network.broker_for(d) if network else deployment.broker_url for d in ids},
            servers={d: network.server_for(d) if network else deployment.server.url for d in ids},
            cloud_url=cloud_url,
            director_root=director_root,
            repository_root=deployment.repo.trusted_root_path,
            initial_bundle=deployment.bundles[version],
            initial_target=install_target(deployment.releases[version]),
            api_url=deployment.server.url,
            token=deployment.token,
        )

    def _start_parts(self, wiring: Wiring) -> None:
        """Start a device process for each share of the devices but this process's own."""
        if not self.others:
            return
        context = multiprocessing.get_context("spawn")  # no copy of this process's threads
        go, self._release = context.Event(), context.Event()
        self._go = go
        scenario_json = self.scenario.model_dump_json()
        for index, members in enumerate(self.others, start=1):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=device_part,
                args=(
                    scenario_json,
                    str(self.workdir),
                    index,
                    members,
                    wiring,
                    theirs,
                    go,
                    self._release,
                ),
                name=f"fleet-sim-devices-{index}",
            )
            process.start()
            part = Part(index, process, ours)
            self.parts.append(part)
            self._readers.append(asyncio.create_task(self._read_part(part)))

    async def _read_part(self, part: Part) -> None:
        while True:
            try:
                kind, *body = await asyncio.to_thread(part.conn.recv)
            except (EOFError, OSError):
                if part.final is None and part.error is None:
                    part.error = f"device process {part.index} ended without its records"
                return
            if kind == "ready":
                part.ready = True
            elif kind == "sample":
                part.sample = body[0]
            elif kind == "final":
                part.final = body[0]
            elif kind == "error":
                part.error = body[0]

    async def _parts_ready(self) -> None:
        deadline = time.monotonic() + CONNECT_WAIT_S * 3
        while not all(p.ready or p.error for p in self.parts) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        failed = [p.error for p in self.parts if p.error]
        if failed:
            raise RuntimeError(f"a device process failed: {failed[0]}")
        if self.parts:
            self._go.set()

    async def _parts_final(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(p.final or p.error for p in self.parts) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    def _stop_parts(self) -> None:
        if self._release is not None:
            self._release.set()
        for part in self.parts:
            part.process.join(STOP_GRACE_S)
            if part.process.is_alive():
                part.process.kill()
                part.process.join(10)

    def _build_devices(self, wiring: Wiring) -> None:
        runtime = default_runtime()
        initial = InstalledModel.from_bundle(
            wiring.initial_bundle.read_bytes(), wiring.initial_target
        )
        self.classes = list(initial.manifest.classes or ())
        model_path = self.workdir / "models" / f"{self.part_index}-{initial.manifest.model_file}"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        model_path.write_bytes(initial.model)
        shared: LoadedModel = runtime.load(model_path)  # one interpreter for every device
        profiles = {h.id: h for h in self.scenario.hardware}
        window_s = self.scenario.traffic.window.total_seconds()
        agent = self.scenario.agent
        poll_s = agent.poll.total_seconds()
        labelled = self.scenario.traffic.labels.share > 0
        order = {d: i for i, d in enumerate(self.scenario_ids)}
        for member in self.members.values():
            device_id = member.device_id
            config = SimDeviceConfig(
                device_id=member.device_id,
                password=member.password,
                namespace=member.namespace,
                hardware_id=member.cohort.hardware,
                server_url=wiring.servers[device_id],
                broker=wiring.brokers[device_id],
                director_root=wiring.director_root,
                repository_root=wiring.repository_root,
                data_dir=self.workdir / "devices" / member.device_id,
                cloud_url=wiring.cloud_url,
                window_s=window_s,
                inference_ms=profiles[member.cohort.hardware].inference_ms,
                # As the agent does: the plan is read with each update check, and at once
                # when the server announces a change; not on a clock of its own.
                poll_s=poll_s,
                plan_poll_s=poll_s,
                heartbeat_s=agent.heartbeat.total_seconds(),
                health_period_s=agent.trial.total_seconds(),
                telemetry_tick_s=telemetry_tick(window_s),
            )
            seed = self.scenario.seed * 100_003 + order[device_id]
            device = SimDevice(config, initial, runtime, model=shared, seed=seed)
            self.devices[member.device_id] = device
            self.callers[member.device_id] = Caller(device, labelled)

    # -- the run itself --------------------------------------------------------

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=THREADS))
        deployment = self.deployment
        assert deployment is not None
        if self.network is not None:
            cloud = deployment.cloud.url if deployment.cloud is not None else None
            await self.network.open(deployment.broker_url, deployment.server.url, cloud)
            self.network.apply([])
        wiring = await asyncio.to_thread(self.wiring)
        self._start_parts(wiring)
        building = time.monotonic()
        await asyncio.to_thread(self._build_devices, wiring)
        self._took("build_devices_s", building)
        stop, traffic_stop = asyncio.Event(), asyncio.Event()
        refreshes = asyncio.Semaphore(REFRESHES_AT_ONCE)
        for device in self.devices.values():
            device.refresh_slots = refreshes
        running: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as tasks:
                for device in self.devices.values():
                    running.append(asyncio.create_task(device.run(stop)))
                await self._until_online()
                await self._parts_ready()
                await self._seen_by_given_server()
                await self._traffic(tasks, traffic_stop)
                await self._settle()
                await self._outcomes()
                produced = self._produced()
                for part in self.parts:
                    if part.final is not None:
                        produced.update(part.final["produced"])
                stored = await asyncio.to_thread(self._stored_windows)
                await self._finish(produced, stored)
                await self._hold()
                await self._end_faults(outlasting=True)
                await self._stop_devices(stop, running)
        finally:
            stop.set()
            if self.parts:
                await asyncio.to_thread(self._stop_parts)
                for reader in self._readers:
                    reader.cancel()
            if self.network is not None:
                self.report.figures.update(self.network.stats())
                await self.network.close()
            gc.collect()  # aiomqtt's clients call back into this loop when collected

    async def _hold(self) -> None:
        """With a ``hold``, call it (in a thread) with the report and the deployment, the
        checks made; the devices keep running (heartbeats, installs, no traffic) until it
        returns."""
        if self.hold is None or self.deployment is None:
            return
        if self.progress is not None:
            self.progress.done()
        self.report.wall_s = round(time.monotonic() - self._started, 1)
        await asyncio.to_thread(self.hold, self.report, self.deployment)

    async def _traffic(self, tasks: asyncio.TaskGroup, traffic_stop: asyncio.Event) -> None:
        """The scenario's traffic, steps, faults and samples for its duration; then the
        traffic stops and the faults that end with it are ended."""
        self.t0 = time.monotonic()
        side = [
            asyncio.create_task(self._sampler(traffic_stop)),
            asyncio.create_task(self._schedule()),
            asyncio.create_task(self._labels(traffic_stop)),
            asyncio.create_task(self._count_stored()),
        ]
        for cohort in self.scenario.cohorts:
            tasks.create_task(self._cohort_traffic(cohort, traffic_stop))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(traffic_stop.wait(), self.scenario.duration.total_seconds())
        traffic_stop.set()
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        await self._end_faults(outlasting=False)

    async def _stop_devices(self, stop: asyncio.Event, running: list[asyncio.Task[None]]) -> None:
        """Stop every device; one still running :data:`STOP_GRACE_S` later is cancelled, and
        where it waited is kept (figure ``stuck_at_stop``) rather than holding the run."""
        stop.set()
        if not running:
            return
        done, pending = await asyncio.wait(running, timeout=STOP_GRACE_S)
        failed = [t.exception() for t in done if not t.cancelled() and t.exception()]
        for error in failed[:SHOWN_ERRORS]:
            log.warning("a device ended with %s: %s", type(error).__name__, error)
        if failed:
            self.report.figures["devices_failed_at_stop"] = len(failed)
        if pending:
            where = []
            for task in pending:
                frames = task.get_stack(limit=1)
                at = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "?"
                where.append(at)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.report.figures["stuck_at_stop"] = dict(Counter(where))
            log.warning(
                "%d devices still running %.0f s after the stop, cancelled: %s",
                len(pending),
                STOP_GRACE_S,
                Counter(where),
            )

    def _produced(self) -> dict[str, list[str]]:
        return {d: [w.window_id for _, w in dev.stats.windows] for d, dev in self.devices.items()}

    async def part_main(self, wiring: Wiring, go: Any, release: Any) -> None:
        """A device process's run: see :func:`device_part`."""
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=THREADS))
        await asyncio.to_thread(self._build_devices, wiring)
        stop, traffic_stop = asyncio.Event(), asyncio.Event()
        refreshes = asyncio.Semaphore(REFRESHES_AT_ONCE)
        for device in self.devices.values():
            device.refresh_slots = refreshes
        running: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as tasks:
                for device in self.devices.values():
                    running.append(asyncio.create_task(device.run(stop)))
                await self._until_online()
                self.conn.send(("ready",))
                await asyncio.to_thread(go.wait)
                await self._traffic(tasks, traffic_stop)
                await asyncio.sleep(self.scenario.traffic.window.total_seconds() + 0.5)
                self.conn.send(("sample", asdict(await self._sample())))
                self.conn.send(
                    (
                        "final",
                        {
                            "produced": self._produced(),
                            "stats": {
                                d: dataclasses.replace(dev.stats, windows=[])
                                for d, dev in self.devices.items()
                            },
                            "unserved": self._unserved(),
                            "labels_posted": self.labels_posted,
                        },
                    )
                )
                await asyncio.to_thread(release.wait)
                await self._end_faults(outlasting=True)
                await self._stop_devices(stop, running)
        finally:
            stop.set()
            gc.collect()

    def _unserved(self) -> dict[str, list[tuple[float, str]]]:
        return {
            d: [*self.unserved.get(d, []), *getattr(dev.stats, "unserved", [])]
            for d, dev in self.devices.items()
        }

    async def _until_online(self) -> None:
        deadline = time.monotonic() + CONNECT_WAIT_S
        started = time.monotonic()
        while time.monotonic() < deadline:
            online = sum(d.link.connected for d in self.devices.values())
            if online == len(self.devices):
                break
            await asyncio.sleep(0.2)
        self.report.figures["connect_s"] = round(time.monotonic() - started, 2)

    async def _seen_by_given_server(self) -> None:
        """On a server given by URL: that it sees the devices online, that is, ingests from
        the broker they connected to; else the run stops, naming the broker."""
        deployment = self.deployment
        assert deployment is not None
        if deployment.external is None or deployment.run_tag is None:
            return
        path = f"/devices?tag={deployment.run_tag}&online=true"
        deadline = time.monotonic() + SEEN_WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # busy: asked again
                if (await asyncio.to_thread(deployment.api, "GET", path))["devices"]:
                    return
            await asyncio.sleep(1.0)
        raise ScenarioError(
            f"--mqtt {deployment.broker_url}: the devices are connected to it, yet "
            f"--server-url {deployment.server.url} saw none of them online within "
            f"{SEEN_WAIT_S:.0f} s: that server ingests from another broker"
        )

    def now(self) -> float:
        """Seconds since the traffic started."""
        return time.monotonic() - self.t0

    # -- traffic and labels ----------------------------------------------------

    async def _cohort_traffic(self, cohort: Cohort, stop: asyncio.Event) -> None:
        """The cohort's devices at its rate: training-like rows, drifted ones from its drift on."""
        rate = cohort.rate or self.scenario.traffic.rate
        seed = self.scenario.seed * 7919 + sum(map(ord, cohort.name))
        rows, labels = generate(self.scenario.traffic.rows, seed)
        ids = [d for d, m in self.members.items() if m.cohort.name == cohort.name]
        phases: list[tuple[float, npt.NDArray[Any], npt.NDArray[Any]]] = [(0.0, rows, labels)]
        if cohort.drift is not None:
            drift = cohort.drift
            conditions = FieldConditions(
                covariate_shift=drift.covariate_shift,
                idle_share=drift.idle_share,
                noise_scale=drift.noise_scale,
            )
            drifted, drifted_labels = generate(self.scenario.traffic.rows, seed + 1, conditions)
            phases.append((drift.at.total_seconds(), drifted, drifted_labels))
        for n, (at, x, y) in enumerate(phases):
            ends = phases[n + 1][0] if n + 1 < len(phases) else None
            with contextlib.suppress(TimeoutError):  # a drift after the end never starts
                await asyncio.wait_for(stop.wait(), max(0.0, at - self.now()))
            if stop.is_set():
                return
            phase_stop = asyncio.Event()

            async def end_phase(
                ends: float | None = ends, phase_stop: asyncio.Event = phase_stop
            ) -> None:
                if ends is None:
                    await stop.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(0.0, ends - self.now()))
                phase_stop.set()

            ender = asyncio.create_task(end_phase())
            await asyncio.gather(
                *(
                    drive(
                        cast(SimDevice, self.callers[d]),
                        x,
                        rate,
                        phase_stop,
                        labels=y,
                        seed=seed + i + 1000 * n,
                    )
                    for i, d in enumerate(ids)
                )
            )
            await ender

    async def _labels(self, stop: asyncio.Event) -> None:
        """Post labels for a share of the stored windows, ``labels.delay`` after they closed."""
        setup = self.scenario.traffic.labels
        if setup.share <= 0:
            return
        delay = setup.delay.total_seconds()
        pick = random.Random(self.scenario.seed + 17)
        decided: set[str] = set()
        while True:
            due = []
            for device_id, device in self.devices.items():
                for closed_at, window in device.stats.windows:
                    if window.window_id in decided or time.monotonic() - closed_at < delay:
                        continue
                    decided.add(window.window_id)
                    if pick.random() < setup.share:
                        due.append((device_id, window))
            if due:
                await asyncio.to_thread(self._post_labels, due)
            await asyncio.sleep(1.0)

    def _post_labels(self, due: list[tuple[str, Any]]) -> None:
        classes = self.classes
        windows = []
        for device_id, window in due:
            pairs = Counter(
                (actual, predicted)
                for at, actual, predicted in self.callers[device_id].predictions
                if window.start <= at < window.end
            )
            if not pairs:
                continue
            windows.append(
                {
                    "window_id": window.window_id,
                    "labels": [
                        {"actual": classes[a], "predicted": classes[p], "count": n}
                        for (a, p), n in sorted(pairs.items())
                    ],
                }
            )
        assert self.api_call is not None
        for start in range(0, len(windows), 100):
            try:
                self.api_call("POST", "/labels", {"windows": windows[start : start + 100]})
                self.labels_posted += len(windows[start : start + 100])
            except AssertionError as exc:  # a window not stored yet: counted, not fatal
                log.info("labels refused: %s", exc)

    # -- steps and faults ------------------------------------------------------

    async def _schedule(self) -> None:
        """The steps in their order, at their times; each fault as a task of its own."""
        events: list[tuple[float, int, Step | Fault]] = []
        events += [(s.at.total_seconds(), n, s) for n, s in enumerate(self.scenario.steps)]
        events += [
            (f.at.total_seconds(), 10_000 + n, f) for n, f in enumerate(self.scenario.faults)
        ]
        faults: set[asyncio.Task[None]] = set()
        try:
            for at, _, event in sorted(events, key=lambda e: (e[0], e[1])):
                if self.part_index and not (
                    isinstance(event, Fault) and device_fault_setter(event.kind, event)
                ):
                    continue  # a device process carries out the device faults only
                await asyncio.sleep(max(0.0, at - self.now()))
                if isinstance(event, Fault):
                    task = asyncio.create_task(self._start_fault(event))
                    faults.add(task)
                    task.add_done_callback(faults.discard)
                    continue
                try:
                    await self._step(event)
                except Exception as exc:  # a step the server refused: reported, the run goes on
                    log.warning("at %.0f s: %s", self.now(), exc)
                    self.report.decisions.append(
                        {"t": round(self.now(), 1), "step": event.action, "error": str(exc)}
                    )
            await asyncio.Event().wait()  # until the traffic ends
        finally:
            for task in list(faults):
                task.cancel()
            await asyncio.gather(*faults, return_exceptions=True)

    async def _step(self, step: Step) -> None:
        deployment = self.deployment
        assert deployment is not None
        record: dict[str, Any] = {"t": round(self.now(), 1), "step": step.action}
        if step.action == "release":
            assert step.model is not None
            released = await asyncio.to_thread(deployment.release, step.model, step.version)
            record["release"] = f"{released.name}@{released.version}"
        elif step.action == "rollout":
            spec = rollout_spec(step, deployment, self.scenario)
            started, waited = time.monotonic(), False
            while True:
                try:
                    created = await asyncio.to_thread(deployment.api, "POST", "/rollouts", spec)
                    break
                except AssertionError as exc:  # the status and the server's words
                    busy = " 409 " in str(exc) and ROLLOUT_BUSY in str(exc)
                    if not busy or time.monotonic() - started >= ROLLOUT_BUSY_WAIT_S:
                        raise
                    waited = True
                await asyncio.sleep(2.0)
            self.rollouts.append(created["id"])
            record["rollout"] = created["id"]
            if waited:  # for the model's earlier rollout to finish first
                record["t"] = round(self.now(), 1)
                record["waited_s"] = round(time.monotonic() - started, 1)
        elif step.action == "capacity":
            assert step.capacity is not None
            await asyncio.to_thread(
                deployment.api,
                "PUT",
                "/cloud/capacity",
                {"capacity": step.capacity, "headroom": 0.1},
            )
            self.capacity_steps.append(step.capacity)
            record["capacity"] = step.capacity
        elif step.action == "assign":
            release = step.release or deployment.latest
            body = {"release": release, "devices": list(self.devices)}
            await asyncio.to_thread(deployment.api, "POST", "/assignments", body)
            record["assign"] = release
        self.report.decisions.append(record)

    def _targets(self, fault: Fault) -> list[str]:
        """The devices ``fault`` hits, drawn once when the run is made (seeded)."""
        target = fault.target
        by_cohort = self.scenario.device_ids()
        ids = [d for c in self.scenario.cohorts for d in by_cohort[c.name]]
        if target.devices is not None:
            ids = [d for d in target.devices if d in set(ids)]
        if target.cohort is not None:
            ids = [d for d in ids if d in set(by_cohort[target.cohort])]
        if target.share is not None:
            ids = sorted(self.rng.sample(ids, max(1, round(len(ids) * target.share))))
        return ids

    async def _start_fault(self, fault: Fault) -> None:
        targets = self.fault_targets[self.scenario.faults.index(fault)]
        active = ActiveFault(fault, targets)
        if self.network is not None:
            active.groups = {self.network.groups[d] for d in targets}
        applied = await self._apply(fault, targets, active)
        self.report.faults.append(
            {
                "kind": fault.kind,
                "at": round(self.now(), 1),
                "duration_s": fault.duration.total_seconds(),
                "targets": len(targets),
                "applied": applied,
            }
        )
        if not applied.startswith("yes"):
            return
        self.active.append(active)
        if self.network is not None:
            self.network.apply(self.active)
        if fault.duration.total_seconds() > 0:
            await asyncio.sleep(fault.duration.total_seconds())
        await self._end_fault(active)

    async def _end_fault(self, active: ActiveFault) -> None:
        if active not in self.active:
            return
        self.active.remove(active)
        if self.network is not None:
            self.network.apply(self.active)
        if active.undo is not None:
            result = active.undo()
            if asyncio.iscoroutine(result):
                await result

    async def _end_faults(self, *, outlasting: bool) -> None:
        """End the active faults; ``outlasting``: those too whose span outlasts the traffic.

        A fault scheduled past the end of the traffic holds while the run
        settles and makes its checks, as it would for the fleet.
        """
        end = self.scenario.duration.total_seconds()
        for active in list(self.active):
            fault = active.fault
            if outlasting or (fault.at + fault.duration).total_seconds() <= end:
                await self._end_fault(active)

    async def _apply(self, fault: Fault, targets: list[str], active: ActiveFault) -> str:
        """Start ``fault``; ``"yes"``, or why it could not be applied in this run."""
        kind = fault.kind
        if kind in NETWORK_FAULTS or kind in CLOUD_FAULTS:
            assert self.network is not None  # made for every scenario with such faults
            if kind in CLOUD_FAULTS and self.network.cloud is None:
                return f"no: {kind} needs the cloud (server.cloud = true)"
            if kind == "reconnect-storm":
                self.report.figures.setdefault("storm_cut", []).append(
                    self.network.cut(active.groups)
                )
            return "yes"  # the proxies are set as the fault becomes active
        if kind == "broker-restart":
            if self.broker is None:
                return "no: the broker is not the run's own"
            await asyncio.to_thread(self.broker.stop)
            if fault.duration.total_seconds() == 0:
                await asyncio.to_thread(self.broker.start)
                return "yes"
            active.undo = lambda: asyncio.to_thread(self.broker.start)  # type: ignore[union-attr]
            return "yes"
        if kind == "server-kill":
            deployment = self.deployment
            assert deployment is not None
            if deployment.external is not None:
                return "no: the server is not the run's own"
            replica = deployment.servers[-1]
            await asyncio.to_thread(replica.kill)
            active.undo = lambda: asyncio.to_thread(replica.start)
            return "yes"
        device_faults = device_fault_setter(kind, fault)
        if device_faults is not None:
            devices = [self.devices[d] for d in targets if d in self.devices]  # this process's
            if not all(hasattr(d, "faults") for d in devices):
                return "no: these simulated devices have no fault points yet"
            undo = [device_faults(d) for d in devices]
            active.undo = lambda: [u() for u in undo]
            return "yes"
        return f"no: {kind} is not a fault this run knows"

    # -- sampling, settling, checks --------------------------------------------

    async def _sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            sample = await self._sample()
            if self.conn is not None:  # a device process: the run's process samples the fleet
                self.conn.send(("sample", asdict(sample)))
            else:
                self.report.series.append(sample)
                if self.progress is not None:
                    self.progress.show(
                        sample, len(self.scenario_ids), self.scenario.duration.total_seconds()
                    )
                if self.metrics is not None:
                    self.metrics.update(sample, len(self.scenario_ids))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _sample(self) -> Sample:
        online = serving = installing = 0
        versions: Counter[str] = Counter()
        now = self.now()
        for device_id, device in self.devices.items():
            snapshot = device_snapshot(device)
            online += snapshot["online"]
            installing += snapshot["installing"]
            if snapshot["verified"]:
                serving += 1
            elif not snapshot["booting"]:  # up, not starting again after a power cut
                self.unserved.setdefault(device_id, []).append((now, "online, no verified model"))
            if snapshot["version"]:
                versions[snapshot["version"]] += 1
        stats = [d.stats for d in self.devices.values()]
        stored = self._stored_cache
        if self.deployment is not None:
            with contextlib.suppress(Exception):  # busy, or the server down: the last count
                stored = await asyncio.to_thread(self._stored_count)
        self._stored_cache = stored
        requests = sum(s.answered for s in stats)
        produced = sum(len(s.windows) for s in stats)
        cloud = sum(len(s.cloud_answers) for s in stats)
        faults = {a.fault.kind for a in self.active}
        for part in self.parts:  # the device processes' latest
            if part.sample is not None:
                theirs = part.sample
                online += theirs["online"]
                serving += theirs["serving"]
                installing += theirs["installing"]
                requests += theirs["requests"]
                produced += theirs["windows_produced"]
                cloud += theirs["cloud_answers"]
                faults |= set(filter(None, theirs["faults_active"].split(";")))
                for item in filter(None, theirs["versions"].split(";")):
                    version, _, n = item.partition("=")
                    versions[version] += int(n)
        return Sample(
            t=round(now, 1),
            online=online,
            serving=serving,
            installing=installing,
            requests=requests,
            windows_produced=produced,
            windows_stored=stored,
            cloud_answers=cloud,
            faults_active=";".join(sorted(faults)),
            versions=";".join(f"{v}={n}" for v, n in sorted(versions.items())),
        )

    def _stored_count(self) -> int:
        assert self.deployment is not None
        database = self.deployment.database
        if database is None:
            return sum(self._stored_by_device.values())
        with contextlib.closing(
            sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2)
        ) as db:
            return int(db.execute("SELECT count(*) FROM windows").fetchone()[0])

    def _stored_windows(self) -> dict[str, list[str]]:
        """The window ids the server stored, by device (its database, else its API)."""
        assert self.deployment is not None
        database = self.deployment.database
        fleet = [m.device_id for m in self.all_members] or list(self.devices)
        stored: dict[str, list[str]] = {d: [] for d in fleet}
        if database is not None:
            with contextlib.closing(
                sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
            ) as db:
                for window_id, device_id in db.execute("SELECT window_id, device_id FROM windows"):
                    stored.setdefault(device_id, []).append(window_id)
            return stored
        for device_id in fleet:  # every process's devices
            stored[device_id] = self._device_windows(device_id)
        self._stored_by_device = {d: len(ids) for d, ids in stored.items()}
        return stored

    def _device_windows(self, device_id: str) -> list[str]:
        """The ids of the windows of ``device_id`` the server stored, through its API."""
        assert self.deployment is not None
        ids: list[str] = []
        before = None
        while True:
            path = f"/devices/{device_id}/windows?limit=500" + (
                f"&before={before}" if before else ""
            )
            page = self.deployment.api("GET", path)
            ids += [w["window_id"] for w in page["windows"]]
            before = page.get("next_before")
            if not before:
                return ids

    async def _count_stored(self) -> None:
        """Without a database of the run's to read: each device's stored windows counted
        through the API in turn, :data:`STORED_COUNTS_PER_S` devices a second at most, so
        the samples show them (a little late on a large fleet) at a load the server hardly
        notices."""
        if self.deployment is None or self.deployment.database is not None:
            return
        fleet = [m.device_id for m in self.all_members]
        while fleet:
            for device_id in fleet:
                with contextlib.suppress(Exception):  # busy: counted again next round
                    ids = await asyncio.to_thread(self._device_windows, device_id)
                    self._stored_by_device[device_id] = len(ids)
                await asyncio.sleep(1.0 / STORED_COUNTS_PER_S)

    async def _settle(self) -> None:
        """After the traffic: let the open windows close and the server store them."""
        window_s = self.scenario.traffic.window.total_seconds()
        await asyncio.sleep(window_s + 0.5)
        await self._parts_final(CONNECT_WAIT_S)
        theirs = sum(
            len(ids) for p in self.parts if p.final for ids in p.final["produced"].values()
        )
        # While a fault outlasting the traffic holds, what is not stored soon will not be.
        patience = 2 * window_s + 2 if self.active else max(SETTLE_S, 3 * window_s)
        deadline = time.monotonic() + patience
        through_api = self.deployment is not None and self.deployment.database is None
        while time.monotonic() < deadline:
            produced = theirs + sum(len(d.stats.windows) for d in self.devices.values())
            if through_api:  # no database of its own to read: each device's windows, listed
                try:
                    listed = await asyncio.to_thread(self._stored_windows)
                except Exception as exc:  # the server busy: counted again, and at the end
                    log.info("counting the stored windows: %s", exc)
                    listed = {}
                stored = self._stored_cache = sum(len(ids) for ids in listed.values())
            else:
                stored = await asyncio.to_thread(self._stored_count)
            if stored >= produced:
                break
            await asyncio.sleep(2.0 if through_api else 0.5)
        self.report.series.append(await self._sample())

    async def _outcomes(self) -> None:
        """Give the outcomes the scenario expects up to :data:`OUTCOMES_WAIT_S` to land.

        A rollout's last step, a drift alert and the plans after a capacity cut are the
        server's, on its own intervals: on a machine slower than the scenario's clock
        they come after the traffic. Nothing is checked less; the wait is reported
        (``outcomes_waited_s``), and what has not landed by then fails ``expectations``.
        A server given by URL keeps its own pace, which the run does not wait for.
        """
        expect = self.scenario.expect
        if (
            self.deployment is None
            or self.scenario.server.url is not None
            or "expectations" in self.scenario.skip_checks
            or (
                expect.rollout is None
                and expect.rollout_stopped_in_wave is None
                and not expect.drift_alerts
                and not expect.plans_adapt
            )
        ):
            return
        # The share online is the end's, read from the last sample, not waited for.
        record = RunRecord(
            scenario=self.scenario.model_copy(
                update={"expect": expect.model_copy(update={"min_online": None})}
            ),
            stats={},
            produced={},
            stored={},
            rollouts=self.rollouts,
            capacity_steps=self.capacity_steps,
            api=self.deployment.api,
        )
        started = time.monotonic()
        while True:
            try:
                landed = (await asyncio.to_thread(expectations, record)).passed
            except Exception as exc:  # the server busy: asked again
                log.info("checking the expected outcomes: %s", exc)
                landed = False
            if landed or time.monotonic() - started >= OUTCOMES_WAIT_S:
                break
            await asyncio.sleep(2.0)
        self._took("outcomes_waited_s", started)

    async def _finish(self, produced: dict[str, list[str]], stored: dict[str, list[str]]) -> None:
        assert self.deployment is not None
        all_stats = {d: dev.stats for d, dev in self.devices.items()}
        unserved = self._unserved()
        for part in self.parts:
            if part.final is None:
                raise RuntimeError(
                    f"device process {part.index} sent no records: {part.error or 'no answer'}"
                )
            all_stats.update(part.final["stats"])
            unserved.update(part.final["unserved"])
            self.labels_posted += part.final["labels_posted"]
        record = RunRecord(
            scenario=self.scenario,
            stats=all_stats,
            produced=produced,
            stored=stored,
            unserved=unserved,
            series=self.report.series,
            rollouts=self.rollouts,
            capacity_steps=self.capacity_steps,
            api=self.deployment.api,
        )
        self.report.checks = await asyncio.to_thread(make_checks, record)
        for rollout_id in self.rollouts:  # what the server decided, and on what evidence
            with contextlib.suppress(Exception):
                view = await asyncio.to_thread(
                    self.deployment.api, "GET", f"/rollouts/{rollout_id}"
                )
                self.report.decisions.append(
                    {
                        "rollout": rollout_id,
                        **{k: view.get(k) for k in ("phase", "stage", "reason", "missing")},
                        "evaluations": view.get("evaluations"),
                        "decisions": view.get("decisions"),
                    }
                )
        stats = list(all_stats.values())
        self.report.figures.update(
            {
                "processes": 1 + len(self.parts),
                "requests": sum(s.requests for s in stats),
                "answered": sum(s.answered for s in stats),
                "windows_produced": sum(len(ids) for ids in produced.values()),
                "windows_stored": sum(len(v) for v in stored.values()),
                "cloud_answers": sum(len(s.cloud_answers) for s in stats),
                "labels_posted": self.labels_posted,
                **device_figures(stats),
                "broker": self.broker.kind if self.broker else "given",
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "cpu_s": round(sum(os.times()[:2]), 1),
                "rollouts": self.rollouts,
            }
        )


# -- helpers -------------------------------------------------------------------


def check_runnable(scenario: Scenario) -> None:
    """Refuse, before anything starts, what the run could not carry out: a rollout spec the
    server would refuse, a step without what it needs, drift of a feature the data has not."""
    if scenario.server.url is not None:
        check_given_setup(scenario)
    for n, cohort in enumerate(scenario.cohorts):
        if cohort.drift is not None:
            try:
                FieldConditions(covariate_shift=cohort.drift.covariate_shift)
            except ValueError as exc:
                raise ScenarioError(f"cohorts.{n}.drift.covariate_shift: {exc}") from None
    for n, step in enumerate(scenario.steps):
        if step.action == "rollout":
            try:
                RolloutSpec.model_validate(rollout_fields(step, scenario, "x@1.0.0"))
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
                )
                raise ScenarioError(f"steps.{n}.rollout: {problems}") from None
        if step.action == "release" and step.model is None:
            raise ScenarioError(f"steps.{n}.model: a release step names the model to release")
        if step.action == "capacity" and step.capacity is None:
            raise ScenarioError(f"steps.{n}.capacity: a capacity step gives the capacity")
        if step.action == "capacity" and not scenario.server.cloud:
            raise ScenarioError(f"steps.{n}: a capacity step needs server.cloud = true")


GIVEN = "a server given by URL (--server-url, server.url)"


def check_given_setup(scenario: Scenario) -> None:
    """Refuse what a run against a server given by URL cannot have: what the run would start
    or stop beside a server of its own (the cloud endpoint, replicas, the broker)."""
    setup = scenario.server
    if not (setup.token and setup.broker):
        raise ScenarioError(
            f"{GIVEN} needs an admin token of it (--token, server.token) and the broker it "
            "ingests from (--mqtt, server.broker), which the devices connect to"
        )
    if setup.cloud:
        raise ScenarioError(
            f"server.cloud = true: the cloud endpoint is started beside a server the run starts "
            f"itself; {GIVEN} has none the run knows of (run this scenario without --server-url)"
        )
    if setup.replicas > 1 or setup.database is not None:
        raise ScenarioError(
            f"server.replicas and server.database set up a server the run starts itself; "
            f"with {GIVEN} leave them out"
        )
    tls = str(setup.url).startswith("https://") or setup.broker.startswith("mqtts://")
    if tls and needs_network(scenario):
        raise ScenarioError(
            "the scenario's links and network faults run the devices' connections through "
            "plain TCP proxies of the run; give --server-url http:// and --mqtt mqtt:// URLs"
        )
    for n, fault in enumerate(scenario.faults):
        if fault.kind in ("server-kill", "broker-restart"):
            what = "server" if fault.kind == "server-kill" else "broker"
            raise ScenarioError(
                f"faults.{n}: {fault.kind} stops the run's own {what}; with {GIVEN} the "
                f"{what} is not the run's to stop"
            )


def check_given_server(scenario: Scenario) -> None:
    """Before anything starts: that the given server answers and takes the token as an
    admin's, that the given broker answers, and that the server holds nothing the run would
    make (releases, the scenario's devices). Each refusal names the flag and what was refused."""
    setup = scenario.server
    assert setup.url is not None and setup.token is not None and setup.broker is not None
    flag = f"--server-url {setup.url}"
    try:
        client = RestClient(setup.url, setup.token, timeout_s=60.0)
        client.get("/tokens")  # an admin's operation: the run registers devices and releases
    except ApiClientError as exc:
        if exc.status == 401:
            raise ScenarioError(f"{flag} refused --token: {exc}") from None
        if exc.status == 403:
            raise ScenarioError(
                f"{flag}: --token is not an admin token of that server (the run registers "
                f"devices and pushes releases): {exc}"
            ) from None
        raise ScenarioError(f"{flag}: {exc}") from None
    broker = parse_broker_url(setup.broker)
    try:
        socket.create_connection((broker.host, broker.port), timeout=10).close()
    except OSError as exc:
        raise ScenarioError(
            f"--mqtt {setup.broker}: cannot reach the broker at {broker.host}:{broker.port}: "
            f"{exc.strerror or exc}"
        ) from None
    try:
        releases = client.get("/releases")["releases"]
        known = {d["id"] for d in client.get("/devices", include_decommissioned=True)["devices"]}
    except ApiClientError as exc:
        raise ScenarioError(f"{flag}: {exc}") from None
    if releases:
        raise ScenarioError(
            f"{flag} holds releases already ({len(releases)}): the run releases its sample "
            "models under release keys of its own, which that server's image repository does "
            "not trust; give a server without releases"
        )
    taken = sorted(known & {d for ids in scenario.device_ids().values() for d in ids})
    if taken:
        shown = ", ".join(taken[:SHOWN_ERRORS]) + (" …" if len(taken) > SHOWN_ERRORS else "")
        raise ScenarioError(
            f"{flag} has devices of this scenario's names registered already ({len(taken)}: "
            f"{shown}); the run registers its devices anew, so give a server without them"
        )


def first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception of ``group`` that is not itself a group."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


@contextlib.contextmanager
def refused_by(server_url: str | None) -> Iterator[None]:
    """A given server's refusal of the run's set-up as a :class:`ScenarioError` naming it."""
    if server_url is None:
        yield
        return
    try:
        yield
    except AssertionError as exc:  # ServerProcess.api: the request, status and answer
        raise ScenarioError(f"--server-url {server_url} refused the run's set-up: {exc}") from None
    except urllib3.exceptions.HTTPError as exc:
        raise ScenarioError(f"--server-url {server_url}: cannot reach the server: {exc}") from None


def rollout_fields(step: Step, scenario: Scenario, release: str) -> dict[str, Any]:
    spec = dict(step.rollout or {})
    spec.setdefault("release", release)
    spec.setdefault("select", ",".join(f"hardware={h.id}" for h in scenario.hardware))
    spec.setdefault("waves", [10, 50, 100])
    spec.setdefault("bake", "30s")
    return spec


def rollout_spec(step: Step, deployment: Deployment, scenario: Scenario) -> dict[str, Any]:
    """The spec to post: the step's fields over defaults (the latest release, every device).

    On a server given by URL a selector without tags is narrowed to the run's own devices.
    """
    spec = rollout_fields(step, scenario, deployment.latest)
    select = spec["select"]
    if deployment.run_tag is not None:
        if isinstance(select, str) and not parse_selector(select).tag:
            spec["select"] = f"{select},tag={deployment.run_tag}"
        elif isinstance(select, dict) and not select.get("tag"):
            spec["select"] = {**select, "tag": [deployment.run_tag]}
    return spec


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """The interpreter's thread switch interval set to ``seconds`` while the block runs."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


def telemetry_tick(window_s: float) -> float:
    """How often a device looks for a closed window: a thirtieth of a window, 0.25–1 s.

    A window closes at the first look after it is due; a thousand devices looking
    four times a second cost their loop more than their requests at a long window.
    """
    return max(0.25, min(1.0, window_s / 30))


def device_figures(stats: list[Any]) -> dict[str, Any]:
    """The devices' own counts of what the faults did (where the devices keep them)."""
    figures: dict[str, Any] = {}
    for name in ("reboots", "power_cuts", "disk_full_errors", "desired_pushes", "windows_lost"):
        if stats and hasattr(stats[0], name):
            figures[name] = sum(getattr(s, name) for s in stats)
    if stats and hasattr(stats[0], "installs"):
        installs: Counter[str] = Counter()
        for s in stats:
            installs.update(s.installs)
        figures["installs"] = dict(installs)
    return figures


def device_snapshot(device: SimDevice) -> dict[str, Any]:
    """What a device shows now: online, verified model, booting, installing, its version."""
    shown = device.snapshot()
    return {
        "online": shown.online,
        "verified": shown.verified,
        "booting": shown.booting,
        "installing": shown.installing,
        "version": shown.active_version,
    }


def device_fault_setter(kind: str, fault: Fault) -> Callable[[Any], Callable[[], None]] | None:
    """For a device fault: a function that sets it on a device and returns its undoing."""

    def setting(name: str, value: Any, off: Any) -> Callable[[Any], Callable[[], None]]:
        def apply(device: Any) -> Callable[[], None]:
            setattr(device.faults, name, value)
            return lambda: setattr(device.faults, name, off)

        return apply

    if kind == "clock-offset":
        return setting("clock_offset_s", fault.offset_s, 0.0)
    if kind == "disk-full":
        return setting("disk_full", True, False)
    if kind == "power-cut":
        if fault.step is not None:
            return setting("power_cut_at", fault.step, None)

        def cut(device: Any) -> Callable[[], None]:
            device.power_cut()
            return lambda: None

        return cut
    if kind in ("desired-lost", "desired-duplicate"):
        mode = "lost" if kind == "desired-lost" else "duplicate"

        def desired(device: Any) -> Callable[[], None]:
            device.faults.desired = mode
            device.faults.desired_share = fault.share or 1.0

            def undo() -> None:
                device.faults.desired = "normal"

            return undo

        return desired
    return None


def run_scenario(
    scenario: Scenario,
    workdir: Path,
    *,
    progress: bool,
    metrics_port: int | None,
    hold: Hold | None = None,
) -> RunReport:
    """Carry out ``scenario`` in ``workdir`` (emptied first) and return its report.

    A virtual-clock scenario (``mode = "virtual"``) is handed to
    :func:`simulator.virtual.run_virtual`. A real one with ``hold`` calls it once the
    checks are made, and keeps its fleet, broker and servers up until it returns.
    """
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    line = ProgressLine(sys.stderr) if progress else None
    with run_log(workdir / "fleet-sim.log"):
        if scenario.mode == "virtual":  # its own module, loaded only for it
            virtual = importlib.import_module("simulator.virtual")
            duration = scenario.duration.total_seconds()
            shown = (lambda s: line.show(s, scenario.devices, duration)) if line else None
            report = virtual.run_virtual(
                scenario, workdir, trace=workdir / "virtual.trace", progress=shown
            )
            if line is not None:
                line.done()
            return cast(RunReport, report)
        run = Run(scenario, workdir, progress=line, metrics_port=metrics_port, hold=hold)
        try:
            return run.execute()
        finally:
            if line is not None:
                line.done()


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """What the devices and the run log goes to the run's folder; the terminal shows progress.

    A reconnect storm makes every device warn at once: on the terminal that
    would bury the progress line, in the file it is the run's record.
    """
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = (root.level, list(root.handlers))
    for old in saved[1]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved[0])
        for old in saved[1]:
            root.addHandler(old)
