"""A new device joins a fleet: the director's root from ``fleetctl``, enrolment by token.

Real processes throughout: a ``fleet-server`` on the shared Mosquitto (its own
namespace), ``fleetctl`` and ``edge-agent`` run as commands. The operator
writes the director's root with ``fleetctl director root --out`` and creates
a provisioning token; the device's first ``edge-agent run`` enrols itself,
stores its password 0600, talks MQTT on the namespace the server named, and
verifies the director with that root when it installs what it is assigned.
"""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.fleet import AgentProcess
from testbed.images import HARDWARE
from testbed.mosquitto import free_port
from testbed.server_process import ServerProcess, wait_until

pytestmark = pytest.mark.integration

SHARED_BROKER = "mqtt://127.0.0.1:1883"
EXIT_REFUSED = 3


def command(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    module = {"fleetctl": "fleet_server.fleetctl", "edge-agent": "agent.cli"}[tool]
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@dataclass
class Fleet:
    server: ServerProcess
    tmp: Path
    image_root: Path

    def fleetctl(self, *args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
        remote = ["--server", self.server.url]
        if token:
            remote += ["--token-file", str(self.server.data / "admin.token")]
        return command("fleetctl", *args, *remote)

    def ok(self, *args: str) -> Any:
        r = self.fleetctl("--json", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def device_config(self, device_id: str, token: str, **sections: dict[str, Any]) -> Path:
        """An agent.toml with [enrolment] and no credentials or namespace of its own."""
        home = self.tmp / device_id
        home.mkdir()
        (home / "token").write_text(token + "\n")
        lines = [
            f'device_id = "{device_id}"',
            f'hardware_id = "{HARDWARE}"',
            f'data_dir = "{home}"',
            "[image_repository]",
            f'url = "{self.server.url}/repository"',
            f'root = "{self.image_root}"',
            "[director]",
            f'url = "{self.server.url}/director"',
            f'root = "{home / "director-root.json"}"',
            "[server]",
            f'url = "{sections.pop("server_url", self.server.url)}"',
            f'broker = "{SHARED_BROKER}"',
            "[enrolment]",
            f'token_file = "{home / "token"}"',
            *(f"{k} = {json.dumps(v)}" for k, v in sections.pop("enrolment", {}).items()),
            "[api]",
            "port = 0",
            "[update]",
            "poll_interval_s = 0.5",
            "health_period_s = 0.5",
        ]
        config = home / "agent.toml"
        config.write_text("\n".join(lines) + "\n")
        return config


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("onboarding")
    server = ServerProcess(tmp / "servers", db_url=None, broker=SHARED_BROKER, replica_id="a")
    server.start()
    try:
        keys, repo = tmp / "keys", tmp / "repo"
        repo.mkdir()
        assert command("fleetctl", "keys", "init", "--dir", str(keys)).returncode == 0
        added = command(
            "fleetctl",
            "release",
            "add",
            str(bundles["v1"]),
            "--repo",
            str(repo),
            "--keys",
            str(keys),
        )
        assert added.returncode == 0, added.stderr
        f = Fleet(server, tmp, repo / "metadata" / "1.root.json")
        f.ok("release", "push", "--repo", str(repo))
        yield f
    finally:
        server.stop()


def one_line(r: subprocess.CompletedProcess[str], tool: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"{tool}: "), line
    return line


def test_fleetctl_writes_the_directors_root_or_prints_it(fleet: Fleet) -> None:
    on_server = json.loads(
        (fleet.server.data / "director" / "metadata" / "1.root.json").read_text()
    )
    out = fleet.tmp / "director-root.json"
    r = fleet.fleetctl("director", "root", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"Wrote the director's root (version 1) to {out}" in r.stdout
    assert json.loads(out.read_text()) == on_server
    assert on_server["signed"]["_type"] == "root"

    printed = fleet.fleetctl("director", "root")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == on_server
    assert fleet.ok("director", "root") == on_server  # --json: the same root

    refused = fleet.fleetctl("director", "root", "--out", str(fleet.tmp / "x.json"), token=False)
    assert refused.returncode == 1
    assert "(401)" in one_line(refused, "fleetctl")
    assert not (fleet.tmp / "x.json").exists()


def test_a_device_enrols_on_first_start_and_never_again(fleet: Fleet) -> None:
    device_id = f"pump-{secrets.token_hex(3)}"
    created = fleet.ok("provisioning-token", "create", "--hardware", HARDWARE, "--uses", "1")
    config = fleet.device_config(device_id, created["token"])
    home = config.parent
    # The device's director root, as the operator hands it out.
    r = fleet.fleetctl("director", "root", "--out", str(home / "director-root.json"))
    assert r.returncode == 0, r.stderr

    agent = AgentProcess(config)
    agent.wait_ready()
    password = home / "password"
    assert stat.S_IMODE(password.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "enrolment.json").stat().st_mode) == 0o600
    assert len(password.read_text().strip()) >= 24
    assert not list(home.glob(".*.tmp"))
    stored = json.loads((home / "enrolment.json").read_text())
    assert stored["mqtt_namespace"] == fleet.server.namespace
    assert "password" not in stored

    listed = {d["id"]: d for d in fleet.ok("devices", "list")}
    assert listed[device_id]["hardware_id"] == HARDWARE
    # Online only if it talks MQTT on the namespace the server named at enrolment.
    wait_until(
        f"{device_id} to be online",
        lambda: fleet.ok("devices", "show", device_id)["online"],
    )
    # It verifies the director with the root fleetctl wrote, over its new credentials.
    fleet.ok("assign", "pump-health@1.0.0", "--device", device_id)
    agent.wait_for(
        "v1 installed",
        lambda: (agent.journal().get("installed") or {}).get("version") == "1.0.0",
    )
    assert agent.stop() == 0

    before = password.read_bytes()
    agent = AgentProcess(config)
    agent.wait_ready()
    wait_until(
        f"{device_id} online again", lambda: fleet.ok("devices", "show", device_id)["online"]
    )
    assert agent.stop() == 0
    assert password.read_bytes() == before
    assert agent.tail().count("enrolled with") == 1
    audit = fleet.ok("audit", "list", "--action", "device.register", "--limit", "1000")
    assert [e["actor"] for e in audit["entries"] if e["subject"] == device_id] == [
        f"device:{device_id}"
    ]

    # The token was for one device: a second one is refused, in one line.
    other = fleet.device_config(f"{device_id}-b", created["token"])
    r = command("edge-agent", "run", "--config", str(other))
    assert r.returncode == EXIT_REFUSED
    assert one_line(r, "edge-agent") == (
        f"edge-agent: {fleet.server.url} refused to enrol {device_id}-b (401): "
        "the provisioning token is unknown, used up or expired"
    )
    assert not (other.parent / "password").exists()


def test_a_refused_enrolment_is_one_line_and_stores_nothing(fleet: Fleet) -> None:
    suffix = secrets.token_hex(3)
    orin = fleet.ok("provisioning-token", "create", "--hardware", "jetson-orin")["token"]
    cases = [
        ("0123456789abcdef.not-the-secret", "(401): the provisioning token is unknown"),
        (orin, "(401): this token enrols only jetson-orin devices"),
        ("no-dot-in-it", "the provisioning token is not of the form ID.SECRET"),
    ]
    for i, (token, expected) in enumerate(cases):
        config = fleet.device_config(f"refused-{suffix}-{i}", token)
        r = command("edge-agent", "run", "--config", str(config))
        assert r.returncode == EXIT_REFUSED, r.stderr
        line = one_line(r, "edge-agent")
        assert expected in line, line
        assert token not in line  # a secret never lands in a log
        assert not (config.parent / "password").exists()
        assert not (config.parent / "enrolment.json").exists()


def test_an_unreachable_server_is_asked_again_until_it_answers(fleet: Fleet) -> None:
    port = free_port()
    config = fleet.device_config(
        f"patient-{secrets.token_hex(3)}",
        "0123456789abcdef.secret",
        server_url=f"http://127.0.0.1:{port}",
        enrolment={"retry_initial_s": 0.05, "retry_max_s": 0.2},
    )
    agent = AgentProcess(config)
    try:
        agent.wait_for("two retries", lambda: agent.tail().count("retrying in") >= 2)
        assert agent.proc.poll() is None
        assert f"enrolment with http://127.0.0.1:{port}: cannot reach it" in agent.tail()
        assert not (config.parent / "password").exists()
    finally:
        agent.stop()
