"""The first end-to-end path: release engineer → fleet server → broker → real devices.

Real processes throughout: one ``fleet-server``, three ``edge-agent run``
devices, a real MQTT broker and database. The release engineer builds and
releases v1 and v2 (and v3-bad); the operator assigns v1 to the line, v2 to
the canary by tag; the canary is stopped, v3-bad is assigned while it is
offline, it comes back, installs, fails the watchdog, rolls back to v2, and
the server shows why. Used by the end-to-end tests (``fleet-sim demo`` tells the fleet
chapter with :mod:`simulator.demo_fleet` now).
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3

from agent.cli import main as edge_agent
from firmware_images.datagen import FieldConditions, generate
from fleet_server.fleetctl import main as fleetctl
from testbed import waiting
from testbed.fleet import AgentProcess
from testbed.images import HARDWARE, MODELS, temperature
from testbed.waiting import free_port

TOOLS: dict[str, Callable[[Sequence[str]], int]] = {"fleetctl": fleetctl, "edge-agent": edge_agent}


class StoryError(Exception):
    """A step of the story did not turn out as it should."""


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    """:func:`testbed.waiting.wait_until`, failing the story with :class:`StoryError`."""
    return waiting.wait_until(what, probe, timeout, every=0.1, failure=StoryError)


@dataclass
class Device:
    """One ``edge-agent run`` process that can be stopped and started again."""

    device_id: str
    config: Path
    agent: AgentProcess | None = None

    @property
    def data_dir(self) -> Path:
        return self.config.parent

    def start(self) -> None:
        self.agent = AgentProcess(self.config)
        try:
            self.agent.wait_ready(timeout=60)
        except AssertionError as exc:
            raise StoryError(f"{self.device_id} did not start: {exc}") from None

    @property
    def api(self) -> str:
        return str(json.loads((self.data_dir / "agent.json").read_text())["api"])

    def journal(self) -> dict[str, Any]:
        return self.agent.journal() if self.agent is not None else {}

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.agent = None


@dataclass
class FleetStory:
    """Runs the story in ``workdir`` against ``broker`` and ``db_url``."""

    workdir: Path
    broker: str
    db_url: str
    device_prefix: str = "pump"
    shared_subscription: bool = True
    echo: bool = False
    server: subprocess.Popen[bytes] | None = None
    devices: dict[str, Device] = field(default_factory=dict)
    http: urllib3.PoolManager = field(
        default_factory=lambda: urllib3.PoolManager(
            retries=False, timeout=urllib3.Timeout(connect=5, read=60)
        )
    )

    # -- plumbing ------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def run(self, command: str, *, json_out: bool = False) -> Any:
        """Run a ``fleetctl``/``edge-agent`` command in process; its JSON if asked."""
        tool, *args = shlex.split(command)
        if json_out:
            args = ["--json", *args] if tool == "fleetctl" else [*args, "--json"]
        self.say(f"\n$ {command}")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = TOOLS[tool](args)
        text = out.getvalue()
        if self.echo and not json_out:
            print(text, end="", flush=True)
        if code != 0:
            raise StoryError(f"{command!r} failed with status {code}")
        return json.loads(text) if json_out else text

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str) -> Any:
        token = (self.data / "admin.token").read_text().strip()
        r = self.http.request(
            "GET", f"{self.url}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}
        )
        if r.status != 200:
            raise StoryError(f"GET {path}: {r.status} {r.data[:200]!r}")
        return json.loads(r.data)

    def device_view(self, device_id: str) -> dict[str, Any]:
        return dict(self.api(f"/devices/{device_id}"))

    # -- the story -----------------------------------------------------------

    def start_server(self) -> None:
        self.data = self.workdir / "server"
        self.port = free_port()
        args = [
            sys.executable,
            "-m",
            "fleet_server.cli",
            "--data",
            str(self.data),
            "--db",
            self.db_url,
            "--mqtt",
            self.broker,
            "--http",
            f"127.0.0.1:{self.port}",
        ]
        if not self.shared_subscription:
            args.append("--no-shared-subscription")
        self.say(
            f"\n$ fleet-server --data {self.data} --db {self.db_url} --mqtt {self.broker} "
            f"--http 127.0.0.1:{self.port}"
        )
        self.data.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "server.log").open("ab")
        self.server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def healthy() -> bool:
            if self.server is not None and self.server.poll() is not None:
                log_text = (self.workdir / "server.log").read_text(errors="replace")
                refusal = [line for line in log_text.splitlines() if "fleet-server:" in line]
                raise StoryError(
                    f"the fleet server exited with status {self.server.returncode}"
                    + (f": {refusal[-1]}" if refusal else "")
                )
            try:
                return self.http.request("GET", f"{self.url}/healthz").status == 200
            except urllib3.exceptions.HTTPError:
                return False

        wait_until("the fleet server", healthy)
        wait_until("the admin token", lambda: (self.data / "admin.token").exists())
        self.token = self.data / "admin.token"
        self.remote = f"--server {self.url} --token-file {self.token}"

    def release(self) -> None:
        keys, repo, built = self.workdir / "keys", self.workdir / "repo", self.workdir / "bundles"
        built.mkdir(exist_ok=True)
        self.repo = repo
        self.run(f"fleetctl keys init --dir {keys}")
        data = f"--baseline {MODELS / 'baseline.npy'} --features {MODELS / 'features.json'}"
        data += f" --calibration {MODELS / 'heldout.npz'}"
        for model, version in (("v1", "1.0.0"), ("v2", "1.1.0"), ("v3-bad", "1.2.0")):
            self.run(
                f"fleetctl bundle build {MODELS / model}.tflite --name pump-health "
                f"--version {version} --hardware {HARDWARE} {data} "
                f"--temperature {temperature(model)} --out {built}"
            )
            self.run(
                f"fleetctl release add {built}/pump-health-{version}.bundle --repo {repo} "
                f"--keys {keys}"
            )
        self.run(f"fleetctl release push --repo {repo} {self.remote}")

    def enrol_devices(self, count: int = 3) -> list[str]:
        ids = [f"{self.device_prefix}-{i}" for i in range(1, count + 1)]
        director_root = self.workdir / "director-root.json"  # every device's [director] root
        self.run(f"fleetctl director root --out {director_root} {self.remote}")
        for i, device_id in enumerate(ids):
            tags = "--tag line-a" + (" --tag canary" if i == 0 else "")
            created = self.run(
                f"fleetctl devices register {device_id} --hardware {HARDWARE} {tags} {self.remote}",
                json_out=True,
            )
            namespace = created["mqtt_namespace"]  # the server names the device's topics
            home = self.workdir / device_id
            home.mkdir(exist_ok=True)
            (home / "password").write_text(created["password"])
            (home / "password").chmod(0o600)
            config = home / "agent.toml"
            config.write_text(
                f'device_id = "{device_id}"\nhardware_id = "{HARDWARE}"\ndata_dir = "{home}"\n'
                f'[image_repository]\nurl = "{self.url}/repository"\n'
                f'root = "{self.repo / "metadata" / "1.root.json"}"\n'
                f'[director]\nurl = "{self.url}/director"\nroot = "{director_root}"\n'
                f'[server]\nurl = "{self.url}"\nbroker = "{self.broker}"\n'
                f'[credentials]\nusername = "{device_id}"\npassword_file = "{home / "password"}"\n'
                f'[mqtt]\nnamespace = "{namespace}"\n'
                "[api]\nport = 0\n"
                "[update]\npoll_interval_s = 30\nhealth_period_s = 2.0\n"
                "[telemetry]\nwindow_max_seconds = 2.0\n"
            )
            self.devices[device_id] = Device(device_id, config)
        for device in self.devices.values():
            device.start()
        self.say(f"  started {len(ids)} edge-agent processes: {', '.join(ids)}")
        return ids

    def wait_active(self, device_id: str, version: str, timeout: float = 60) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            view = self.device_view(device_id)
            committed = view.get("phase") == "idle"  # past its health period
            return (
                view
                if committed and view.get("active_bundle") == f"pump-health {version}"
                else None
            )

        view: dict[str, Any] = wait_until(f"{device_id} to report {version}", probe, timeout)
        return view

    def wait_outcome(self, device_id: str, version: str, result: str) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            reported = self.device_view(device_id).get("reported") or {}
            outcome = reported.get("last_outcome") or {}
            if outcome.get("result") == result and outcome["bundle"]["version"] == version:
                return dict(outcome)
            return None

        outcome: dict[str, Any] = wait_until(f"{device_id} to report {result} {version}", probe)
        return outcome

    def field_traffic(self, device: Device, stop: threading.Event, answers: list[int]) -> None:
        """Requests with field data, a tenth from idle machines, until ``stop``."""
        rows, _ = generate(500, 5, FieldConditions(idle_share=0.1))
        i = 0
        while not stop.is_set():
            try:
                body = {
                    "inputs": [
                        {
                            "name": "features",
                            "shape": [1, 16],
                            "datatype": "FP32",
                            "data": [float(v) for v in rows[i % len(rows)]],
                        }
                    ]
                }
                r = self.http.request(
                    "POST", f"{device.api}/v2/models/pump-health/infer", json=body
                )
                answers.append(r.status)
            except (urllib3.exceptions.HTTPError, FileNotFoundError, KeyError, ValueError):
                pass  # the device is restarting
            i += 1
            time.sleep(0.01)

    def tell(self) -> dict[str, Any]:
        """The whole story; returns what the server shows at the end."""
        self.start_server()
        self.say("\n-- release engineer: build, sign, push --")
        self.release()
        self.say("\n-- operator: register devices and start them --")
        ids = self.enrol_devices()
        canary = ids[0]
        self.say("\n-- operator: v1 to line-a, then v2 to the canary by tag --")
        self.run(f"fleetctl assign pump-health@1.0.0 --tag line-a {self.remote}")
        for device_id in ids:
            self.wait_active(device_id, "1.0.0")
        self.run(f"fleetctl assign pump-health@1.1.0 --tag canary {self.remote}")
        self.wait_active(canary, "1.1.0")
        self.run(f"fleetctl devices list {self.remote}")

        self.say(f"\n-- {canary} goes offline; v3-bad is assigned meanwhile --")
        self.devices[canary].stop()
        wait_until(f"{canary} to be offline", lambda: not self.device_view(canary)["online"])
        self.run(f"fleetctl assign pump-health@1.2.0 --device {canary} {self.remote}")
        self.say(f"\n-- {canary} comes back, gets the retained assignment, serves field data --")
        self.devices[canary].start()
        answers: list[int] = []
        stop = threading.Event()
        sender = threading.Thread(
            target=self.field_traffic, args=(self.devices[canary], stop, answers)
        )
        sender.start()
        try:
            outcome = self.wait_outcome(canary, "1.2.0", "rolled_back")
        finally:
            stop.set()
            sender.join()
        self.wait_active(canary, "1.1.0")
        self.run(f"fleetctl devices show {canary} {self.remote}")
        self.run(f"fleetctl devices events {canary} --limit 8 {self.remote}")
        self.run(f"fleetctl audit verify {self.remote}")
        windows = wait_until(
            "the canary's telemetry windows to be stored and acknowledged",
            lambda: self.windows_acknowledged(self.devices[canary]),
        )
        self.say(
            f"  {canary}: {windows} feature-summary windows stored by the server and "
            "acknowledged; its outbox is empty"
        )
        self.run(f"fleetctl drift --device {canary} {self.remote}")
        views = {d: self.device_view(d) for d in ids}
        events = self.api(f"/devices/{canary}/events?limit=200")["events"]
        return {
            "canary": canary,
            "ids": ids,
            "views": views,
            "outcome": outcome,
            "events": events,
            "answers": answers,
            "windows": windows,
        }

    def windows_acknowledged(self, device: Device) -> int:
        """How many windows the device's outbox saw acknowledged, once none is pending.

        Read-only: opening the outbox for writing would make the running agent resend.
        """
        path = device.data_dir / "outbox.db"
        if not path.exists():
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            pending = db.execute("SELECT count(*) FROM windows").fetchone()[0]
            row = db.execute("SELECT value FROM counters WHERE name = 'acknowledged'").fetchone()
        except sqlite3.Error:
            return 0
        finally:
            db.close()
        acknowledged = int(row[0]) if row else 0
        return acknowledged if acknowledged and not pending else 0

    def close(self) -> None:
        for device in self.devices.values():
            device.stop()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.server.kill()
