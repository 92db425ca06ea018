"""A hybrid-inference deployment for tests and benchmarks: server, cloud endpoint, devices.

:class:`HybridDeployment` starts, in ``workdir``:

- a real ``fleet-server`` process (:class:`testbed.server_process.ServerProcess`)
  on its own SQLite database, on the given broker in a topic namespace of
  its own (derived from its database path, so tests sharing the machine's
  Mosquitto never see each other's messages);
- the release engineer's work: release keys, an image repository holding the
  device model (for :data:`testbed.images.HARDWARE`) and the cloud model (for
  hardware ``cloud``), pushed to the server;
- the cloud endpoint, ``fleet-server cloud``, as its own process, serving the
  cloud model it verified from the server's image repository, authenticating
  devices and reading quotas and capacity from the same database.

:meth:`HybridDeployment.register` registers devices (credentials, namespace,
weight) and returns what a :class:`simulator.sim_device.SimDevice` needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy.typing as npt
import urllib3

from agent.ota.journal import InstallTarget
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository, ReleasedBundle
from simulator.sim_device import InstalledModel, SimDevice, SimDeviceConfig, drive
from testbed.api_server import repository_files
from testbed.images import HARDWARE, make_bundle
from testbed.server_process import ServerProcess
from testbed.waiting import free_port, wait_until

CLOUD_HARDWARE = "cloud"
MODEL_NAME = "pump-health"
STOP_GRACE_S = 30.0
log = logging.getLogger(__name__)
THREADS = 32  # the devices' loop's worker threads
REFRESHES_AT_ONCE = 4
_STOPPED_LOOPS: list[
    asyncio.AbstractEventLoop
] = []  # see SimFleet.stop  # director refreshes under way at once in one simulation
T = TypeVar("T")


@dataclass(frozen=True)
class Registered:
    """A registered device: its id, credential and topic namespace."""

    device_id: str
    password: str
    namespace: str


class CloudProcess:
    """``fleet-server cloud`` as its own process; ready once ``/v2/health/ready`` answers 200."""

    def __init__(self, workdir: Path, args: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "cloud.log"
        self.args = [
            sys.executable,
            "-m",
            "fleet_server.cli",
            "cloud",
            *args,
            "--http",
            f"127.0.0.1:{self.port}",
        ]
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        """Start the process (again, on the same port, after :meth:`kill` or :meth:`stop`)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"fleet-server cloud exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                return self.http.request("GET", f"{self.url}/v2/health/ready").status == 200
            except urllib3.exceptions.HTTPError:
                return False

        wait_until("the cloud endpoint to load its model", ready, timeout)

    def metrics(self) -> str:
        return str(self.http.request("GET", f"{self.url}/metrics").data.decode())

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]

    def kill(self) -> None:
        """SIGKILL: the endpoint is gone at once (connections refused until :meth:`start`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class HybridDeployment:
    """A fleet server, its cloud endpoint and the sample models released; see the module."""

    def __init__(
        self,
        workdir: Path,
        *,
        broker: str = "mqtt://127.0.0.1:1883",
        device_model: str = "v2",
        cloud_model: str = "cloud",
        server_args: Sequence[str] = (),
        cloud_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.broker = broker
        workdir.mkdir(parents=True, exist_ok=True)
        self.server = ServerProcess(
            workdir, db_url=None, broker=broker, replica_id="server", extra_args=server_args
        )
        self.server.start()
        self.token = self.server.admin_token()
        self.keys: KeyStore = init_keys(workdir / "keys")
        self.repo = ImageRepository(workdir / "repo")
        self.repo.create(self.keys)
        bundles = workdir / "bundles"
        bundles.mkdir(exist_ok=True)
        device_bundle = make_bundle(bundles, device_model, "2.0.0")
        cloud_bundle = make_bundle(bundles, cloud_model, "2.0.1", hardware=(CLOUD_HARDWARE,))
        self.device_release = self.repo.add_bundle(device_bundle, self.keys)
        self.cloud_release = self.repo.add_bundle(cloud_bundle, self.keys)
        self.api("POST", "/releases", {"files": repository_files(self.repo.path)})
        self.installed = InstalledModel.from_bundle(
            device_bundle.read_bytes(), install_target(self.device_release)
        )
        self.director_root = workdir / "director-root.json"
        self.director_root.write_text(json.dumps(self.api("GET", "/director/root")))
        self.cloud = CloudProcess(
            workdir,
            [
                "--data",
                str(self.server.data),
                "--trusted-root",
                str(self.repo.trusted_root_path),
                *cloud_args,
            ],
        )
        self.cloud.start()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """The server's ``/api/v1`` + ``path`` as the admin; its JSON answer."""
        return self.server.api(method, path, self.token, body)

    def register(self, device_id: str, *, weight: float | None = None) -> Registered:
        created = self.api(
            "POST", "/devices", {"device_id": device_id, "hardware_id": HARDWARE, "tags": []}
        )
        if weight is not None:
            self.set_weight(device_id, weight)
        return Registered(device_id, created["password"], created["mqtt_namespace"])

    def set_weight(self, device_id: str, weight: float) -> None:
        self.api("PATCH", f"/devices/{device_id}/hybrid", {"weight": weight})

    def set_capacity(self, capacity: float, headroom: float = 0.1) -> Any:
        return self.api("PUT", "/cloud/capacity", {"capacity": capacity, "headroom": headroom})

    def plans(self) -> dict[str, dict[str, Any]]:
        """Every device's current plan as ``/api/v1/plans`` shows it, by device id."""
        return {p["device_id"]: p for p in self.api("GET", "/plans")["plans"]}

    def device_config(self, device: Registered, data_dir: Path, **settings: Any) -> SimDeviceConfig:
        """What a simulated device of ``device`` needs to join this deployment."""
        return SimDeviceConfig(
            device_id=device.device_id,
            password=device.password,
            namespace=device.namespace,
            hardware_id=HARDWARE,
            server_url=self.server.url,
            broker=self.broker,
            director_root=self.director_root,
            repository_root=self.repo.trusted_root_path,
            data_dir=data_dir,
            cloud_url=self.cloud.url,
            **settings,
        )

    def close(self) -> None:
        try:
            self.cloud.stop()
        finally:
            self.server.stop(STOP_GRACE_S)


def install_target(release: ReleasedBundle) -> InstallTarget:
    """The bundle as a device that installed it records it."""
    return InstallTarget(
        path=release.target_path,
        name=release.name,
        version=release.version,
        release_counter=release.release_counter,
        hashes={"sha256": release.sha256},
        length=release.length,
    )


@dataclass(frozen=True)
class Traffic:
    """Poisson requests at ``rate`` a second, rows (and labels) drawn in turn from ``rows``."""

    rate: float
    rows: npt.NDArray[Any]
    labels: npt.NDArray[Any] | None = None
    seed: int = 0


class SimFleet:
    """Simulated devices and their traffic, on one event loop in a background thread.

    Tests and benchmarks drive it from their own thread: :meth:`start` runs
    every device (:meth:`SimDevice.run`) and its traffic (:func:`drive`) until
    :meth:`stop`; :meth:`call` runs a coroutine on the devices' loop.
    """

    def __init__(self, devices: Sequence[SimDevice]) -> None:
        self.devices = {d.device_id: d for d in devices}
        self.loop = asyncio.new_event_loop()
        # Blocking work (director refreshes, the outboxes' SQLite) runs in threads: each real
        # device has its own, so many simulated ones must not queue behind a handful.
        self.loop.set_default_executor(ThreadPoolExecutor(max_workers=THREADS))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        # A director refresh (python-tuf: JSON and signatures) is CPU work a real device does on
        # its own CPU; here all devices share one process, and a re-plan wakes them all at once:
        # a few at a time keeps their event loop, and so their cloud latency, as a device's.
        slots = self.call(_new_semaphore(REFRESHES_AT_ONCE))
        for device in self.devices.values():
            device.refresh_slots = slots
        self._stop = self.call(_new_event())
        self._traffic_stop = self.call(_new_event())
        self._running: Any = None
        self.stuck: list[str] = []
        """Where the tasks waited that did not end after a stop (see :meth:`stop`)."""

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coroutine`` on the devices' loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self, traffic: dict[str, Traffic]) -> None:
        """Run every device, and the traffic of those ``traffic`` names."""

        async def main() -> None:
            async with asyncio.TaskGroup() as tasks:
                for device in self.devices.values():
                    tasks.create_task(device.run(self._stop))
                for device_id, t in traffic.items():
                    tasks.create_task(
                        drive(
                            self.devices[device_id],
                            t.rows,
                            t.rate,
                            self._traffic_stop,
                            labels=t.labels,
                            seed=t.seed,
                        )
                    )

        self._running = asyncio.run_coroutine_threadsafe(main(), self.loop)

    def stop_traffic(self) -> None:
        """No new requests from now on (those under way finish)."""
        self.loop.call_soon_threadsafe(self._traffic_stop.set)

    def stop(self, timeout: float = 30) -> None:
        """Stop the traffic, then the devices (their last windows into the outbox), then the loop.

        Tasks still running ``timeout`` seconds after the stop are cancelled;
        where each of them waited is kept in :attr:`stuck` (and logged).
        """
        try:
            self.stop_traffic()
            self.loop.call_soon_threadsafe(self._stop.set)
            if self._running is not None:
                try:
                    self._running.result(timeout)
                except concurrent.futures.TimeoutError:
                    self.stuck = self.call(_where_tasks_wait(), 10)
                    log.warning(
                        "simulated devices still running %.0f s after the stop, cancelled: %s",
                        timeout,
                        "; ".join(self.stuck),
                    )
                    self._running.cancel()
                    with contextlib.suppress(concurrent.futures.CancelledError, TimeoutError):
                        self._running.result(10)
        finally:
            # aiomqtt's clients call back into their loop when paho's objects are collected;
            # collected later, from a closed loop, that raises inside whatever code the
            # collector interrupted. Collect them now, and never close a simulation's loop.
            with contextlib.suppress(Exception):
                self.call(_collect(), 10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            _STOPPED_LOOPS.append(self.loop)


async def _collect() -> None:
    gc.collect()


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


async def _new_semaphore(value: int) -> asyncio.Semaphore:
    return asyncio.Semaphore(value)


async def _where_tasks_wait() -> list[str]:
    me = asyncio.current_task()
    where = []
    for task in asyncio.all_tasks():
        if task is not me:
            frames = task.get_stack(limit=1)
            frame = frames[0] if frames else None
            at = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"
            where.append(f"{task.get_coro()} at {at}")
    return sorted(where)
