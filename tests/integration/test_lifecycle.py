"""Device and release lifecycle against a real ``fleet-server`` process, driven by ``fleetctl``.

Decommissioning a device, rotating its credentials and yanking a release,
each through ``fleetctl`` run as its own process; devices are plain HTTP
clients, paho MQTT clients and the agent's own update resolution, as a
device in the field would be. On SQLite and PostgreSQL; the server uses the
machine's shared Mosquitto on a namespace of its own.
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import urllib3
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from agent.ota.fetch_worker import resolve
from fleet_server.config import ServerConfig
from fleet_server.director import DirectorRepository
from fleet_server.fleetctl import main
from protocol.messages import BundleRef, DeviceEvent, ReportedState
from protocol.topics import device_topic
from testbed.images import HARDWARE
from testbed.mosquitto import free_port, running_mosquitto
from testbed.server_process import (
    DROPPED,
    DeviceClient,
    ServerProcess,
    clear_retained,
    wait_until,
)
from tests.support.databases import DATABASES, database_url
from tests.support.fleetctl import Result, fleetctl_process, one_line_error

pytestmark = pytest.mark.integration

SHARED_BROKER = "mqtt://127.0.0.1:1883"


@dataclass
class Fleet:
    server: ServerProcess
    director: DirectorRepository
    repo: Path
    tmp: Path
    capsys: pytest.CaptureFixture[str] | None = None

    def _remote(self) -> list[str]:
        return ["--server", self.server.url, "--token-file", str(self.server.data / "admin.token")]

    def ctl(self, *args: str, remote: bool = True) -> Result:
        """``fleetctl ARGS`` in this process (quick, for what a test only reads)."""
        assert self.capsys is not None
        self.capsys.readouterr()
        code = main([*args, *(self._remote() if remote else [])])
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    def fleetctl(self, *args: str) -> Result:
        """``fleetctl ARGS`` against the server as its own process, as an operator runs it."""
        extra = self._remote()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        return fleetctl_process([*args, *extra], env=env)

    def register(self, device_id: str) -> str:
        """Pre-register a device with fleetctl; returns its password."""
        run = self.ctl("devices", "register", device_id, "--hardware", HARDWARE, "--json")
        assert run.code == 0, run.err
        return str(run.json()["password"])

    def get(self, path: str, device_id: str, password: str) -> int:
        """The status of a device's GET on the server's hosting routes."""
        headers = urllib3.make_headers(basic_auth=f"{device_id}:{password}")
        return self.server.http.request("GET", self.server.url + path, headers=headers).status

    def api(self, path: str) -> Any:
        return self.server.api("GET", path, self.server.admin_token())

    def publish(self, device_id: str, channel: str, message: Any) -> None:
        client = DeviceClient(SHARED_BROKER, device_id)
        try:
            client.publish(
                device_topic(self.server.namespace, device_id, channel),  # type: ignore[arg-type]
                message.model_dump_json().encode(),
            )
            client.flush()
        finally:
            client.close()

    def agent(self, device_id: str, password: str) -> AgentConfig:
        """An agent configuration of ``device_id`` against this server, in its own folder."""
        data = self.tmp / "agents" / f"{device_id}-{secrets.token_hex(3)}"
        data.mkdir(parents=True)
        (data / "password").write_text(password + "\n")
        return AgentConfig.model_validate(
            {
                "device_id": device_id,
                "hardware_id": HARDWARE,
                "data_dir": data,
                "credentials": {"password_file": data / "password"},
                "image_repository": {
                    "url": f"{self.server.url}/repository",
                    "root": self.repo / "metadata" / "1.root.json",
                },
                "director": {
                    "url": f"{self.server.url}/director",
                    "root": self.director.trusted_root_path,
                },
            }
        )


@pytest.fixture(scope="module", params=DATABASES)
def deployment(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bundles: dict[str, Path],
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp(f"lifecycle-{request.param}")
    with database_url(request.param, tmp) as url:
        server = ServerProcess(
            tmp, db_url=url, broker=SHARED_BROKER, replica_id=f"life-{secrets.token_hex(3)}"
        )
        server.start()
        try:
            server.admin_token()
            director = DirectorRepository(
                ServerConfig(data_dir=server.data, db_url=url).director_dir
            )
            fleet = Fleet(server, director, tmp / "repo", tmp)
            keys = str(tmp / "keys")
            assert main(["keys", "init", "--dir", keys]) == 0
            for bundle in (bundles["v1"], bundles["v2"]):
                add = ["release", "add", str(bundle), "--repo", str(fleet.repo), "--keys", keys]
                assert main(add) == 0
            assert main(["release", "push", "--repo", str(fleet.repo), *fleet._remote()]) == 0
            yield fleet
        finally:
            server.stop()
            clear_retained(f"edgefleet/v1/{server.namespace}/#")


@pytest.fixture
def fleet(deployment: Fleet, capsys: pytest.CaptureFixture[str]) -> Fleet:
    deployment.capsys = capsys
    return deployment


# -- decommissioning -----------------------------------------------------------------


def registered(fleet: Fleet) -> float:
    """The server's ``edgefleet_devices_registered`` gauge."""
    r = fleet.server.http.request("GET", f"{fleet.server.url}/metrics")
    for family in text_string_to_metric_families(r.data.decode()):
        for sample in family.samples:
            if sample.name == "edgefleet_devices_registered":
                return float(sample.value)
    raise AssertionError("no edgefleet_devices_registered in /metrics")


def hello(device_id: str, message_id: str) -> DeviceEvent:
    return DeviceEvent(
        device_id=device_id, message_id=message_id, sent_at=time.time(), event="hello", at=1.0
    )


def test_a_decommissioned_device_is_refused_everywhere_and_its_history_kept(
    fleet: Fleet,
) -> None:
    password = fleet.register("dec-1")
    own = "/director/devices/dec-1/metadata/timestamp.json"
    assert fleet.get(own, "dec-1", password) == 200
    fleet.publish("dec-1", "events", hello("dec-1", "dec-1-before"))
    wait_until(
        "dec-1's event to be stored",
        lambda: fleet.api("/devices/dec-1/events")["events"],
    )
    assigned = fleet.ctl("assign", "pump-health@1.0.0", "--device", "dec-1")
    assert assigned.code == 0, assigned.err
    assert fleet.director.signed("dec-1").target_path is not None
    counted = registered(fleet)

    done = fleet.fleetctl("devices", "decommission", "dec-1", "--reason", "returned for repair")
    assert done.code == 0, done.err
    assert "no longer work" in done.out and "fleetctl broker config" in done.out

    # Its credentials stop working at once: director metadata, its root, the image repository.
    for path in (own, "/director/metadata/1.root.json", "/repository/metadata/timestamp.json"):
        assert fleet.get(path, "dec-1", password) == 401, path
    # Its assignment is withdrawn (signed empty), so its id reused later starts clean.
    assert fleet.director.signed("dec-1").target_path is None
    # Its MQTT messages are dropped and counted.
    before = fleet.server.counter(DROPPED, "reason").get("decommissioned-device", 0.0)
    fleet.publish("dec-1", "events", hello("dec-1", "dec-1-after"))
    wait_until(
        "the decommissioned device's message to be dropped",
        lambda: fleet.server.counter(DROPPED, "reason").get("decommissioned-device", 0.0) > before,
    )

    listed = fleet.ctl("devices", "list", "--json").json()
    assert "dec-1" not in [d["id"] for d in listed]
    assert registered(fleet) == counted - 1
    every = fleet.ctl("devices", "list", "--all")
    line = next(line for line in every.out.splitlines() if line.startswith("dec-1 "))
    assert "decommissioned" in line
    shown = fleet.ctl("devices", "show", "dec-1")
    assert "decommissioned:" in shown.out and "returned for repair" in shown.out
    # Its history is kept: the event it sent before, and the audit entry.
    events = fleet.ctl("devices", "events", "dec-1", "--json").json()
    assert [e["message_id"] for e in events] == ["dec-1-before"]
    audit = fleet.ctl("audit", "list", "--action", "device.decommission", "--json").json()
    entry = next(e for e in audit["entries"] if e["subject"] == "dec-1")
    assert entry["details"]["reason"] == "returned for repair"

    # A decommissioned device takes no changes.
    err = one_line_error(fleet.fleetctl("devices", "decommission", "dec-1"))
    assert "409" in err and "decommissioned" in err
    err = one_line_error(fleet.ctl("assign", "pump-health@1.0.0", "--device", "dec-1"))
    assert "409" in err and "dec-1 is decommissioned" in err
    err = one_line_error(fleet.ctl("devices", "rotate-credentials", "dec-1"))
    assert "409" in err and "dec-1 is decommissioned" in err
    err = one_line_error(fleet.ctl("devices", "tag", "dec-1", "--add", "x"))
    assert "409" in err


def test_a_decommissioned_id_is_reused_only_when_asked(fleet: Fleet) -> None:
    old = fleet.register("dec-2")
    assert fleet.ctl("devices", "decommission", "dec-2").code == 0
    err = one_line_error(fleet.fleetctl("devices", "register", "dec-2", "--hardware", HARDWARE))
    assert "409" in err and "was decommissioned" in err and "--reuse-decommissioned" in err
    # Enrolling itself with a provisioning token never takes a decommissioned id.
    token = fleet.ctl("provisioning-token", "create", "--json").json()["token"]
    enrol = fleet.server.request(
        "POST",
        "/api/v1/devices/enrol",
        body={"token": token, "device_id": "dec-2", "hardware_id": HARDWARE},
    )
    assert enrol.status == 409, enrol.data
    again = fleet.fleetctl(
        "devices", "register", "dec-2", "--hardware", HARDWARE, "--reuse-decommissioned", "--json"
    )
    assert again.code == 0, again.err
    new = again.json()["password"]
    own = "/director/devices/dec-2/metadata/timestamp.json"
    assert fleet.get(own, "dec-2", new) == 200
    assert fleet.get(own, "dec-2", old) == 401
    shown = fleet.ctl("devices", "show", "dec-2", "--json").json()
    assert shown["decommissioned_at"] is None and shown["assigned_target"] is None
    audit = fleet.ctl("audit", "list", "--action", "device.register", "--json").json()
    reused = [e for e in audit["entries"] if e["subject"] == "dec-2"]
    assert len(reused) == 2 and "reuses_decommissioned" in reused[-1]["details"]


# -- rotating credentials --------------------------------------------------------------


def test_rotated_credentials_replace_the_old_password_at_once(fleet: Fleet) -> None:
    old = fleet.register("rot-1")
    own = "/director/devices/rot-1/metadata/timestamp.json"
    assert fleet.get(own, "rot-1", old) == 200  # and remembered by the server for a while
    rotated = fleet.fleetctl("devices", "rotate-credentials", "rot-1")
    assert rotated.code == 0, rotated.err
    lines = rotated.out.splitlines()
    new = lines[lines.index(next(x for x in lines if x.startswith("Password"))) + 1].strip()
    assert new and new != old
    assert "old password no longer works" in rotated.out and "kill -HUP" in rotated.out
    assert fleet.get(own, "rot-1", old) == 401
    assert fleet.get("/repository/metadata/timestamp.json", "rot-1", old) == 401
    assert fleet.get(own, "rot-1", new) == 200
    # The agent itself, with the new password in its credentials file, is served.
    target, _ = resolve(fleet.agent("rot-1", new), 0)
    assert target is None  # nothing assigned yet, and no refusal
    again = fleet.fleetctl("devices", "rotate-credentials", "rot-1", "--json").json()
    assert again["password"] != new and again["device_id"] == "rot-1"
    assert fleet.get(own, "rot-1", new) == 401
    audit = fleet.ctl("audit", "list", "--action", "device.rotate-credentials", "--json")
    assert [e["subject"] for e in audit.json()["entries"]].count("rot-1") == 2
    err = one_line_error(fleet.ctl("devices", "rotate-credentials", "ghost"))
    assert "404" in err and "no device ghost" in err


def test_passwords_are_written_to_a_file_readable_by_its_owner_only(
    fleet: Fleet, tmp_path: Path
) -> None:
    own = "/director/devices/out-1/metadata/timestamp.json"
    first = tmp_path / "out-1.pw"
    registered = fleet.ctl(
        "devices", "register", "out-1", "--hardware", HARDWARE, "--out", str(first)
    )
    assert registered.code == 0, registered.err
    password = first.read_text().strip()
    assert password and password not in registered.out
    assert f"Password written to {first} (mode 0600" in registered.out
    assert "MQTT namespace" in registered.out
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert fleet.get(own, "out-1", password) == 200

    rotated = fleet.ctl("devices", "rotate-credentials", "out-1", "--out", str(first), "--json")
    assert rotated.code == 0, rotated.err
    assert "password" not in rotated.json() and rotated.json()["out"] == str(first)
    new = first.read_text().strip()
    assert new != password and stat.S_IMODE(first.stat().st_mode) == 0o600
    assert fleet.get(own, "out-1", password) == 401
    assert fleet.get(own, "out-1", new) == 200
    assert not list(tmp_path.glob(".*.tmp"))

    # A folder that does not exist is refused before the server makes a password.
    missing = str(tmp_path / "nowhere" / "pw")
    err = one_line_error(fleet.ctl("devices", "rotate-credentials", "out-1", "--out", missing))
    assert "nowhere" in err and "no credentials were rotated" in err
    assert fleet.get(own, "out-1", new) == 200
    err = one_line_error(
        fleet.ctl("devices", "register", "out-2", "--hardware", HARDWARE, "--out", missing)
    )
    assert "no device was registered" in err
    assert fleet.ctl("devices", "show", "out-2").code == 1


# -- yanking a release -------------------------------------------------------------------


def report_running(fleet: Fleet, device_id: str, version: str, counter: int) -> None:
    """The device reports over MQTT that it runs ``pump-health VERSION``; wait until stored."""
    fleet.publish(
        device_id,
        "state",
        ReportedState(
            device_id=device_id,
            message_id=f"{device_id}-state-{secrets.token_hex(4)}",
            sent_at=time.time(),
            agent_version="0.1.0",
            hardware_id=HARDWARE,
            active=BundleRef(name="pump-health", version=version, release_counter=counter),
            installed_counter=counter,
            phase="idle",
        ),
    )
    wait_until(
        f"{device_id}'s reported state",
        lambda: fleet.api(f"/devices/{device_id}")["active_bundle"] == f"pump-health {version}",
    )


def test_a_yanked_release_is_offered_only_to_devices_running_it(fleet: Fleet) -> None:
    releases = {r["version"]: r for r in fleet.api("/releases")["releases"]}
    passwords = {d: fleet.register(d) for d in ("yank-run", "yank-wait", "yank-new")}
    assigned = fleet.ctl(
        "assign", "pump-health@2.0.0", "--device", "yank-run", "--device", "yank-wait"
    )
    assert assigned.code == 0, assigned.err
    report_running(fleet, "yank-run", "2.0.0", releases["2.0.0"]["release_counter"])
    target, _ = resolve(fleet.agent("yank-wait", passwords["yank-wait"]), 0)
    assert target is not None and target.version == "2.0.0"  # offered before the yank

    yanked = fleet.fleetctl("release", "yank", "pump-health@2.0.0", "--reason", "false alarms")
    assert yanked.code == 0, yanked.err
    assert "withdrawn from 1 device(s) not running it" in yanked.out and "yank-wait" in yanked.out
    assert "1 device(s) running it keep it" in yanked.out and "yank-run" in yanked.out
    assert "not a rollback" in yanked.out and "--re-release-of" in yanked.out

    # The device not on it yet is no longer offered it: the agent's own check finds nothing.
    target, _ = resolve(fleet.agent("yank-wait", passwords["yank-wait"]), 0)
    assert target is None
    # The device running it keeps it.
    target, _ = resolve(fleet.agent("yank-run", passwords["yank-run"]), 0)
    assert target is not None and target.version == "2.0.0"
    # Assigning it is refused naming the reason, by device and by tag.
    err = one_line_error(fleet.fleetctl("assign", "pump-health@2.0.0", "--device", "yank-new"))
    assert "409" in err and "yanked: false alarms" in err
    assert fleet.director.signed("yank-new").target_path is None
    # Listed with its reason; the image repository (signed offline) still lists it.
    listed = {r["version"]: r for r in fleet.ctl("release", "list", "--json").json()}
    assert listed["2.0.0"]["yank_reason"] == "false alarms" and listed["2.0.0"]["yanked_at"]
    assert listed["1.0.0"]["yanked_at"] is None
    table = fleet.ctl("release", "list").out
    assert "[yanked" in table and "false alarms" in table
    assert (
        fleet.get("/repository/metadata/timestamp.json", "yank-new", passwords["yank-new"]) == 200
    )
    # Once only, audited with what it did.
    err = one_line_error(fleet.ctl("release", "yank", "pump-health@2.0.0", "--reason", "x"))
    assert "409" in err and "yanked already" in err
    audit = fleet.ctl("audit", "list", "--action", "release.yank", "--json").json()
    (entry,) = [e for e in audit["entries"] if e["details"]["version"] == "2.0.0"]
    assert entry["details"]["withdrawn"] == ["yank-wait"] and entry["details"]["kept"] == [
        "yank-run"
    ]
    assert entry["details"]["reason"] == "false alarms"
    # Another release is assigned as ever.
    assert fleet.ctl("assign", "pump-health@1.0.0", "--device", "yank-new").code == 0
    err = one_line_error(fleet.ctl("release", "yank", "nope@1.0.0", "--reason", "x"))
    assert "404" in err


def test_only_admins_decommission_and_rotate_and_operators_yank(fleet: Fleet) -> None:
    tokens = {}
    for role in ("viewer", "operator"):
        made = fleet.ctl("tokens", "create", "--name", f"life-{role}", "--role", role, "--json")
        assert made.code == 0, made.err
        tokens[role] = made.json()["token"]
    fleet.register("roles-1")
    for method, path, body, role in (
        ("POST", "/devices/roles-1/decommission", {}, "operator"),
        ("POST", "/devices/roles-1/credentials", None, "operator"),
        ("POST", "/releases/yank", {"release": "pump-health@1.0.0", "reason": "x"}, "viewer"),
    ):
        r = fleet.server.request(method, f"/api/v1{path}", token=tokens[role], body=body)
        assert r.status == 403, (path, r.status, r.data)
    assert fleet.api("/devices/roles-1")["decommissioned_at"] is None
    assert all(
        r["yanked_at"] is None or r["version"] != "1.0.0"
        for r in fleet.api("/releases")["releases"]
    )


# -- the broker, after a rotation or a decommission ---------------------------------------


def test_a_reloaded_broker_config_refuses_and_disconnects_the_old_credentials(
    tmp_path: Path,
) -> None:
    """What the README tells operators: write the broker config again, then ``kill -HUP``."""
    passwords = {user: secrets.token_urlsafe(24) for user in ("fleet", "rot-m", "dec-m")}
    for user, password in passwords.items():
        (tmp_path / f"{user}.password").write_text(password + "\n")
    port = free_port()
    out = tmp_path / "mosquitto"

    def broker_config(*devices: str) -> None:
        argv = ["broker", "config", "--out", str(out), "--server-user", "fleet"]
        argv += ["--namespace", "life", "--server-password-file", str(tmp_path / "fleet.password")]
        for device in devices:
            argv += ["--device", f"{device}:{tmp_path / f'{device}.password'}"]
        assert main([*argv, "--port", str(port), "--bind", "127.0.0.1"]) == 0

    def connect(user: str, password: str) -> tuple[paho.Client | None, list[int]]:
        """A connected client (``None`` if refused) and its disconnections' reason codes."""
        gone: list[int] = []
        answers: list[bool] = []
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{secrets.token_hex(3)}")
        c.username_pw_set(user, password)
        c.reconnect_delay_set(60, 60)  # a disconnection stays visible
        c.on_disconnect = lambda _c, _u, _f, rc, _p: gone.append(int(rc.value))
        c.on_connect = lambda _c, _u, _f, rc, _p: answers.append(not rc.is_failure)
        c.connect("127.0.0.1", port, keepalive=30)
        c.loop_start()
        wait_until(f"the broker to answer {user}", lambda: answers)
        if answers[0]:
            return c, gone
        c.loop_stop()
        return None, gone

    broker_config("rot-m", "dec-m")
    with running_mosquitto(out / "mosquitto.conf", [port]) as broker:
        rotated, rotated_gone = connect("rot-m", passwords["rot-m"])
        removed, removed_gone = connect("dec-m", passwords["dec-m"])
        assert rotated is not None and removed is not None
        try:
            # rot-m's password rotated, dec-m decommissioned: the config written again.
            old = passwords["rot-m"]
            passwords["rot-m"] = secrets.token_urlsafe(24)
            (tmp_path / "rot-m.password").write_text(passwords["rot-m"] + "\n")
            broker_config("rot-m")
            broker.process.send_signal(signal.SIGHUP)
            wait_until("the old connections to be closed", lambda: rotated_gone and removed_gone)
        finally:
            for c in (rotated, removed):
                c.disconnect()
                c.loop_stop()
        for user, password in (("rot-m", old), ("dec-m", passwords["dec-m"])):
            refused, _ = connect(user, password)
            assert refused is None, f"{user} connected with credentials that no longer hold"
        renewed, _ = connect("rot-m", passwords["rot-m"])
        assert renewed is not None
        renewed.disconnect()
        renewed.loop_stop()
