"""Telemetry windows survive outages: broker down, server killed, agent killed mid-send.

Real processes throughout: a private Mosquitto on a free port (never the
machine's shared broker; persistence off), one ``fleet-server`` on a fresh
PostgreSQL database, two ``edge-agent run`` devices serving ``pump-health``
1.0.0 (released and assigned through the server, as :mod:`simulator.fleet_story`
does). Each agent closes a window every second (``window_max_seconds = 1``),
resends unacknowledged windows after 2 s (``ack_timeout_s = 2``) and gets a
steady stream of requests on its local API from a thread of the test.

Each outage lasts at least :data:`OUTAGE_S` = 12 s, long enough for the agents'
keep-alives (5 s), reconnect backoffs (0.2 s to 1 s) and resend timers (2 s) to
run several times, and until the agents are seen to have served and kept windows
through it:

1. the broker is stopped while the agents keep serving (every request is
   answered), then started again on the same port;
2. the server is SIGKILLed, then started on the same data folder and database;
3. the server is frozen (SIGSTOP) so windows are sent but not acknowledged,
   one agent is SIGKILLed while it holds such windows, the server is thawed
   and the agent restarted on the same data folder, where its outbox persists.

The accounting, checked after each scenario (cumulatively, the module's tests
share one fleet), once traffic stopped, every open window closed and every
outbox is empty:

- **Windows, exactly.** The outbox counts every window it stores in the same
  committed transaction as the window (``stored``, durable across restarts),
  and window ids are fresh uuid4s, so ``stored_total`` is the number of
  distinct windows the device produced. Only the agents publish windows, so
  the server's rows for a device are a subset of what it produced; ``window_id``
  is the table's primary key, so the rows are distinct. Hence
  ``rows == stored_total - dropped_total`` (and ``dropped_total == 0``) means
  the server holds every window produced, exactly once. ``acknowledged_total
  == stored_total`` adds that each was acknowledged, once.
- **Requests, exactly.** Every answered request (HTTP 200 from the model) is
  folded into a window of the agent process that answered it. The test counts
  answers per agent process (each has its own API port) and knows when each
  process ran, so the windows a process produced are those whose ``start``
  falls in its lifetime. For a process still running or stopped cleanly,
  ``sum(requests)`` over its stored windows equals its answers exactly: nothing
  lost, nothing counted twice. A SIGKILLed process loses its open window (and
  any closed within the last telemetry tick, before reaching the outbox), so
  for it the sum may only be smaller — never larger.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import shlex
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3
from sqlalchemy import select

from agent.cli import main as edge_agent
from agent.telemetry import Outbox
from firmware_images.datagen import FieldConditions, generate
from fleet_server.db import Database
from fleet_server.db.models import WindowRow
from fleet_server.fleetctl import main as fleetctl
from protocol.window import decode_window
from testbed.fleet import AgentProcess
from testbed.mosquitto import Mosquitto
from testbed.server_process import (
    FAN_IN_LIMITS,
    Broker,
    ServerProcess,
    private_broker,
    wait_until,
)
from tests.support.databases import postgres_database

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODELS = Path(__file__).resolve().parents[2] / "firmware_images" / "models"
HARDWARE = "rpi4-arm64"
VERSION = "1.0.0"
OUTAGE_S = 12.0
DRAIN_TIMEOUT_S = 60.0
TOOLS: dict[str, Callable[[Sequence[str]], int]] = {"fleetctl": fleetctl, "edge-agent": edge_agent}


def run_tool(command: str, *, json_out: bool = False) -> Any:
    """A ``fleetctl`` command, in process; its JSON output if asked."""
    tool, *args = shlex.split(command)
    if json_out:
        args = ["--json", *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = TOOLS[tool](args)
    assert code == 0, f"{command!r} failed with status {code}: {out.getvalue()[-2000:]}"
    return json.loads(out.getvalue()) if json_out else out.getvalue()


# -- the devices' side ---------------------------------------------------------------


@dataclass
class Life:
    """One agent process: its API, when it ran, whether it ended by SIGKILL."""

    process: AgentProcess
    api: str
    began: float  # wall clock, before launch
    ended: float | None = None
    killed: bool = False


@dataclass
class Device:
    device_id: str
    config: Path
    lives: list[Life] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.config.parent

    @property
    def current(self) -> Life:
        return self.lives[-1]

    def start(self) -> Life:
        began = time.time()
        process = AgentProcess(self.config)
        life = Life(process, process.wait_ready(), began)
        self.lives.append(life)
        return life

    def kill(self) -> None:
        life = self.current
        life.process.kill()
        life.process.log.close()
        life.ended, life.killed = time.time(), True

    def stop(self) -> None:
        life = self.current
        if life.ended is None:
            life.process.stop()
            life.ended = time.time()

    def outbox(self) -> dict[str, int]:
        """The outbox's counts, read without disturbing the running agent.

        (Opening :class:`~agent.telemetry.Outbox` on a live agent's file would
        mark all its windows unsent, as after a restart.)
        """
        path = self.data_dir / "outbox.db"
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                counts = dict(db.execute("SELECT name, value FROM counters").fetchall())
                counts["pending"] = db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
                counts["in_flight"] = db.execute(
                    "SELECT COUNT(*) FROM windows WHERE sends > 0"
                ).fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            # No agent holds it (no WAL files to share): the agent's own class reads it.
            with Outbox(path) as outbox:
                stats = outbox.stats()
            counts = {
                "stored": stats.stored_total,
                "acknowledged": stats.acknowledged_total,
                "dropped_size": stats.dropped["size"],
                "dropped_age": stats.dropped["age"],
                "pending": stats.pending,
                "in_flight": 0,
            }
        counts["dropped"] = counts.get("dropped_size", 0) + counts.get("dropped_age", 0)
        return counts

    def held_ids(self) -> set[str]:
        """The ids of the windows in the outbox (read while no agent runs on it)."""
        db = sqlite3.connect(f"file:{self.data_dir / 'outbox.db'}?mode=ro", uri=True, timeout=5)
        try:
            return {str(r[0]) for r in db.execute("SELECT window_id FROM windows")}
        finally:
            db.close()


class Traffic:
    """A thread per device sending one-row requests to its current agent process."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self.devices = devices
        rows, _ = generate(400, 11, FieldConditions(idle_share=0.1))
        self.rows = [[float(v) for v in row] for row in rows]
        # Per agent API (one per process): answers by HTTP status, and failures.
        self.answers: dict[str, Counter[int]] = {}
        self.failures: dict[str, list[str]] = {}
        self.paused: set[str] = set()  # device ids not to send to (being restarted)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._http = urllib3.PoolManager(
            maxsize=4, retries=False, timeout=urllib3.Timeout(connect=2, read=5)
        )
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._send, args=(d,), daemon=True) for d in self.devices
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        self._threads = []

    def answered(self, api: str) -> int:
        with self._lock:
            return self.answers.get(api, Counter())[200]

    def failed(self, apis: Sequence[str]) -> dict[str, list[str]]:
        with self._lock:
            return {a: self.failures[a][:5] for a in apis if self.failures.get(a)}

    def non_200(self, apis: Sequence[str]) -> dict[str, dict[int, int]]:
        with self._lock:
            return {
                a: {s: n for s, n in self.answers.get(a, Counter()).items() if s != 200}
                for a in apis
                if set(self.answers.get(a, Counter())) - {200}
            }

    def _send(self, device: Device) -> None:
        i = 0
        while not self._stop.is_set():
            if device.device_id in self.paused:
                time.sleep(0.02)
                continue
            api = device.current.api
            body = {
                "inputs": [
                    {
                        "name": "features",
                        "shape": [1, 16],
                        "datatype": "FP32",
                        "data": self.rows[i % len(self.rows)],
                    }
                ]
            }
            try:
                r = self._http.request("POST", f"{api}/v2/models/pump-health/infer", json=body)
                with self._lock:
                    self.answers.setdefault(api, Counter())[r.status] += 1
            except urllib3.exceptions.HTTPError as exc:
                with self._lock:
                    self.failures.setdefault(api, []).append(f"{type(exc).__name__}: {exc}")
            i += 1
            time.sleep(0.01)


# -- the fleet ------------------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    broker: Broker
    db_url: str
    server: ServerProcess
    token: str
    devices: list[Device]
    traffic: Traffic
    restarted_brokers: list[Mosquitto] = field(default_factory=list)

    # -- the server's side ------------------------------------------------------

    def stored(self) -> dict[str, list[WindowRow]]:
        return asyncio.run(_stored(self.db_url, [d.device_id for d in self.devices]))

    # -- outages ------------------------------------------------------------------

    def restart_broker(self) -> None:
        """Start Mosquitto again with the same configuration, on the same port."""
        first = self.broker.mosquitto
        log = first.conf.with_name(f"mosquitto-{len(self.restarted_brokers) + 1}.log")
        again = Mosquitto(first.conf, first.ports, log)
        self.restarted_brokers.append(again)
        again.wait_ready()

    def broker_process(self) -> Mosquitto:
        return self.restarted_brokers[-1] if self.restarted_brokers else self.broker.mosquitto

    # -- accounting ---------------------------------------------------------------

    def settle(self, timeout: float = DRAIN_TIMEOUT_S) -> dict[str, list[WindowRow]]:
        """Stop traffic; wait until every outbox is empty and every answer is in a window."""
        self.traffic.stop()

        def settled() -> dict[str, list[WindowRow]] | None:
            if any(d.outbox()["pending"] for d in self.devices):
                return None
            rows = self.stored()
            for d in self.devices:
                for life, total in zip(d.lives, per_life(d, rows[d.device_id]), strict=True):
                    if not life.killed and total != self.traffic.answered(life.api):
                        return None
            return rows

        try:
            rows: dict[str, list[WindowRow]] = wait_until(
                "every outbox to drain and every answer to reach the server", settled, timeout
            )
        except AssertionError:
            rows = self.stored()
        return rows

    def check(self, rows: dict[str, list[WindowRow]]) -> None:
        """The exact accounting of the module docstring."""
        problems: list[str] = []
        for d in self.devices:
            mine = rows[d.device_id]
            box = d.outbox()
            ids = [r.window_id for r in mine]
            if len(ids) != len(set(ids)):
                problems.append(f"{d.device_id}: duplicate window ids in the table")
            if box["pending"]:
                problems.append(f"{d.device_id}: {box['pending']} windows still in the outbox")
            if box["dropped"]:
                problems.append(f"{d.device_id}: the outbox dropped {box['dropped']} windows")
            if len(mine) != box["stored"] - box["dropped"]:
                problems.append(
                    f"{d.device_id}: the agent stored {box['stored']} windows in its outbox "
                    f"(dropped {box['dropped']}); the server has {len(mine)}"
                )
            if box["acknowledged"] != box["stored"] - box["dropped"] - box["pending"]:
                problems.append(f"{d.device_id}: outbox counts do not add up: {box}")
            for row in mine:
                window = decode_window(row.payload)
                if (window.window_id, window.device_id, window.requests) != (
                    row.window_id,
                    d.device_id,
                    row.requests,
                ):
                    problems.append(f"{d.device_id}: row {row.window_id} disagrees with payload")
                if window.model_version != VERSION:
                    problems.append(f"{d.device_id}: window of version {window.model_version}")
            for n, (life, total) in enumerate(
                zip(d.lives, per_life(d, mine), strict=True), start=1
            ):
                answered = self.traffic.answered(life.api)
                if life.killed:
                    if total > answered:
                        problems.append(
                            f"{d.device_id} process {n} (SIGKILLed): its windows count {total} "
                            f"requests but it answered only {answered}"
                        )
                elif total != answered:
                    problems.append(
                        f"{d.device_id} process {n}: answered {answered} requests, its stored "
                        f"windows count {total}"
                    )
        if problems:
            logs = "\n".join(
                f"--- {d.device_id} log tail:\n{d.current.process.tail()[-1500:]}"
                for d in self.devices
            )
            raise AssertionError(
                "\n".join(problems)
                + f"\n--- server log tail:\n{self.server.log_tail(2000)}\n{logs}"
            )


def per_life(device: Device, rows: Sequence[WindowRow]) -> list[int]:
    """Requests counted by the stored windows of each of the device's processes."""
    totals = [0] * len(device.lives)
    for row in rows:
        start = decode_window(row.payload).start
        for i, life in enumerate(device.lives):
            if life.began <= start and (life.ended is None or start <= life.ended):
                totals[i] += row.requests
                break
        else:
            raise AssertionError(f"window {row.window_id} started ({start}) outside any process")
    return totals


async def _stored(db_url: str, device_ids: list[str]) -> dict[str, list[WindowRow]]:
    db = Database(db_url)
    try:
        async with db.session() as session:
            found = await session.scalars(
                select(WindowRow).where(WindowRow.device_id.in_(device_ids))
            )
            rows: dict[str, list[WindowRow]] = {d: [] for d in device_ids}
            for row in found.all():
                rows[row.device_id].append(row)
            return rows
    finally:
        await db.close()


def _release_and_enrol(tmp: Path, server: ServerProcess, broker: str, count: int) -> list[Device]:
    token = server.data / "admin.token"
    remote = f"--server {server.url} --token-file {token}"
    keys, repo, built = tmp / "keys", tmp / "repo", tmp / "bundles"
    built.mkdir()
    data = f"--baseline {MODELS / 'baseline.npy'} --features {MODELS / 'features.json'}"
    data += f" --calibration {MODELS / 'heldout.npz'}"
    run_tool(f"fleetctl keys init --dir {keys}")
    run_tool(
        f"fleetctl bundle build {MODELS / 'v1.tflite'} --name pump-health --version {VERSION} "
        f"--hardware {HARDWARE} {data} --out {built}"
    )
    run_tool(
        f"fleetctl release add {built}/pump-health-{VERSION}.bundle --repo {repo} --keys {keys}"
    )
    run_tool(f"fleetctl release push --repo {repo} {remote}")
    director_root = server.data / "director" / "metadata" / "1.root.json"
    tag = f"outage-{secrets.token_hex(3)}"
    devices = []
    for i in range(1, count + 1):
        device_id = f"{tag}-{i}"
        created = run_tool(
            f"fleetctl devices register {device_id} --hardware {HARDWARE} --tag {tag} {remote}",
            json_out=True,
        )
        home = tmp / device_id
        home.mkdir()
        (home / "password").write_text(created["password"])
        (home / "password").chmod(0o600)
        config = home / "agent.toml"
        config.write_text(
            f'device_id = "{device_id}"\nhardware_id = "{HARDWARE}"\ndata_dir = "{home}"\n'
            f'[image_repository]\nurl = "{server.url}/repository"\n'
            f'root = "{repo / "metadata" / "1.root.json"}"\n'
            f'[director]\nurl = "{server.url}/director"\nroot = "{director_root}"\n'
            f'[server]\nurl = "{server.url}"\nbroker = "{broker}"\n'
            f'[credentials]\nusername = "{device_id}"\npassword_file = "{home / "password"}"\n'
            '[api]\nhost = "127.0.0.1"\nport = 0\n'
            "[update]\npoll_interval_s = 5\nhealth_period_s = 1.0\n"
            f'[mqtt]\nnamespace = "{created["mqtt_namespace"]}"\n'
            "keepalive_s = 5\nheartbeat_interval_s = 1.0\n"
            "reconnect_min_s = 0.2\nreconnect_max_s = 1.0\n"
            "[telemetry]\nwindow_max_seconds = 1.0\nack_timeout_s = 2.0\n"
        )
        devices.append(Device(device_id, config))
    for device in devices:
        device.start()
    run_tool(f"fleetctl assign pump-health@{VERSION} --tag {tag} {remote}")
    for device in devices:

        def active(device_id: str = device.device_id) -> bool:
            view = server.api("GET", f"/devices/{device_id}", server.admin_token())
            return bool(
                view.get("phase") == "idle"
                and view.get("active_bundle") == f"pump-health {VERSION}"
            )

        wait_until(f"{device.device_id} to run {VERSION}", active, 90)
    return devices


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("outage")
    devices: list[Device] = []
    with (
        private_broker(tmp / "broker", extra=(*FAN_IN_LIMITS, "persistence false")) as broker,
        postgres_database() as db_url,
    ):
        server = ServerProcess(tmp, db_url=db_url, broker=broker.url, replica_id="outage")
        w: World | None = None
        try:
            server.start()
            devices = _release_and_enrol(tmp, server, broker.url, 2)
            w = World(tmp, broker, db_url, server, server.admin_token(), devices, Traffic(devices))
            yield w
        finally:
            if w is not None:
                w.traffic.stop()
            for d in devices:
                if d.lives and d.current.ended is None:
                    d.stop()
            if server.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    server.proc.send_signal(signal.SIGCONT)
            server.stop()
            if w is not None:
                for again in w.restarted_brokers:
                    again.stop()


def _serve_for(world: World, seconds: float) -> None:
    """Let traffic run, failing early if an agent died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for d in world.devices:
            if d.current.ended is not None:
                continue  # killed or stopped by the test
            proc = d.current.process.proc
            assert proc.poll() is None, f"{d.device_id} exited: {d.current.process.tail()}"
        time.sleep(0.1)


def _serve_until(
    world: World, what: str, done: Callable[[], bool], timeout: float = DRAIN_TIMEOUT_S
) -> None:
    """Let traffic run until ``done()`` holds, failing if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s: " + ", ".join(
            f"{d.device_id} answered {world.traffic.answered(d.current.api)}, outbox {d.outbox()}"
            for d in world.devices
        )
        _serve_for(world, 0.1)


def _apis(world: World) -> list[str]:
    return [life.api for d in world.devices for life in d.lives]


def test_broker_stopped_and_restarted_loses_no_window(world: World) -> None:
    world.traffic.start()
    _serve_for(world, 3)
    world.broker_process().stop()  # SIGTERM: every connection drops at once
    before = {d.device_id: world.traffic.answered(d.current.api) for d in world.devices}
    _serve_for(world, OUTAGE_S)
    # The agents kept serving while the broker was gone, and kept windows meanwhile.
    _serve_until(
        world,
        "each agent to answer 50 more requests and hold 3 windows with the broker gone",
        lambda: all(
            world.traffic.answered(d.current.api) > before[d.device_id] + 50
            and d.outbox()["pending"] >= 3
            for d in world.devices
        ),
    )
    world.restart_broker()
    _serve_for(world, 3)
    rows = world.settle()
    assert not world.traffic.failed(_apis(world)), world.traffic.failed(_apis(world))
    assert not world.traffic.non_200(_apis(world)), world.traffic.non_200(_apis(world))
    world.check(rows)


def test_server_killed_and_restarted_loses_no_window(world: World) -> None:
    world.traffic.start()
    _serve_for(world, 3)
    world.server.kill()
    _serve_for(world, OUTAGE_S)
    _serve_until(
        world,
        "each agent to hold 3 windows with the server gone",
        lambda: all(d.outbox()["pending"] >= 3 for d in world.devices),
    )
    world.server.start()
    _serve_for(world, 3)
    rows = world.settle()
    assert not world.traffic.failed(_apis(world)), world.traffic.failed(_apis(world))
    assert not world.traffic.non_200(_apis(world)), world.traffic.non_200(_apis(world))
    world.check(rows)


def test_agent_killed_mid_send_loses_no_stored_window(world: World) -> None:
    victim = world.devices[0]
    world.traffic.start()
    _serve_for(world, 2)
    # Frozen, the server receives nothing and acknowledges nothing: the agents'
    # windows are sent (some more than once, after ack_timeout_s) and stay held.
    assert world.server.proc is not None
    world.server.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(
            f"{victim.device_id} to hold sent, unacknowledged windows",
            lambda: victim.outbox()["in_flight"] >= 3,
            20,
        )
        world.traffic.paused.add(victim.device_id)
        victim.kill()
        held = victim.outbox()
        held_ids = victim.held_ids()
    finally:
        world.server.proc.send_signal(signal.SIGCONT)
    assert held["pending"] >= 3, held
    _serve_for(world, 3)  # the server stores what the broker queued; its acks find no one
    victim.start()
    world.traffic.paused.discard(victim.device_id)
    _serve_for(world, 3)
    rows = world.settle()
    survivors = [life.api for d in world.devices for life in d.lives if not life.killed]
    assert not world.traffic.failed(survivors), world.traffic.failed(survivors)
    assert not world.traffic.non_200(_apis(world)), world.traffic.non_200(_apis(world))
    world.check(rows)
    # By id: every window the killed agent held, sent or not, is stored.
    assert held_ids <= {r.window_id for r in rows[victim.device_id]}
    # A clean stop closes each open window into the outbox; the restarted agent sends it.
    for d in world.devices:
        d.stop()
    for d in world.devices:
        d.start()
    world.check(world.settle())
