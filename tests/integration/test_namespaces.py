"""Deployments sharing a broker: each on its own namespace, collisions refused at start.

The servers run on the machine's shared Mosquitto (127.0.0.1:1883), as a second
deployment on a CI machine would, each with a SQLite database in its own
folder. Namespaces given explicitly are unique to the test run, and the
retained claims and records they leave are cleared afterwards.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.publish as paho_publish
import pytest

from fleet_server import fleetctl
from protocol.messages import DeviceEvent
from protocol.topics import device_topic, server_topic
from testbed.mosquitto import free_port
from testbed.server_process import (
    DROPPED,
    INGESTED,
    DeviceClient,
    ServerProcess,
    clear_retained,
    wait_until,
)
from testbed.waiting import observe_for

pytestmark = pytest.mark.integration

SHARED_BROKER = "mqtt://127.0.0.1:1883"
HARDWARE = "rpi4-arm64"


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Servers to stop at the end; the retained server topics of their namespaces cleared."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()
    for namespace in {s.namespace for s in started}:
        clear_retained(f"edgefleet/v1/{namespace}/server/#")


def server(tmp: Path, name: str, db: str, **kwargs: object) -> ServerProcess:
    return ServerProcess(
        tmp, db_url=f"sqlite:///{tmp / db}", broker=SHARED_BROKER, replica_id=name, **kwargs
    )  # type: ignore[arg-type]


def refusal(process: ServerProcess) -> str:
    """The one line a refused server printed; fails if it started or left a traceback."""
    assert process.proc is not None
    process.proc.wait(60)
    output = process.log()
    assert process.returncode == 2, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    lines = [line for line in output.splitlines() if line.startswith("fleet-server: ")]
    assert len(lines) == 1, output[-2000:]
    return lines[0]


def test_two_deployments_on_one_broker_never_see_each_others_device_messages(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    # Both on their default namespace, derived from their own databases.
    a = server(tmp_path, f"a-{secrets.token_hex(3)}", "a.db")
    b = server(tmp_path, f"b-{secrets.token_hex(3)}", "b.db")
    servers += [a, b]
    a.start()
    b.start()
    assert a.namespace != b.namespace
    device_id = f"pump-{secrets.token_hex(3)}"  # the same device id in both deployments
    for s in (a, b):
        created = s.api(
            "POST", "/devices", s.admin_token(), {"device_id": device_id, "hardware_id": HARDWARE}
        )
        assert created["mqtt_namespace"] == s.namespace  # what the device's agent.toml names
    sent: dict[str, list[str]] = {a.namespace: [], b.namespace: []}
    client = DeviceClient(SHARED_BROKER, device_id)
    try:
        for i in range(20):
            for namespace in sent:
                event = DeviceEvent(
                    device_id=device_id,
                    message_id=f"{namespace[-6:]}-{i:04d}",
                    sent_at=1.0,
                    event="hello",
                    at=1.0,
                )
                client.publish(
                    device_topic(namespace, device_id, "events"), event.model_dump_json().encode()
                )
                sent[namespace].append(event.message_id)
        client.flush()
    finally:
        client.close()
    for s in (a, b):
        token = s.admin_token()

        def stored(s: ServerProcess = s, token: str = token) -> list[str]:
            events = s.api("GET", f"/devices/{device_id}/events?limit=100", token)["events"]
            ids = sorted(e["message_id"] for e in events)
            return ids if len(ids) >= 20 else []

        assert wait_until(f"{s.replica_id}'s 20 events", stored) == sorted(sent[s.namespace])
        # Nothing of the other deployment reached it, not even to be dropped.
        assert s.counter(INGESTED, "channel").get("events") == 20
        assert s.counter(DROPPED, "reason") == {}


def test_a_second_deployment_on_a_claimed_namespace_is_refused_naming_the_flag(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    namespace = f"collide-{secrets.token_hex(4)}"
    first = server(tmp_path, "first", "first.db", namespace=namespace)
    other = server(tmp_path, "other", "other.db", namespace=namespace)
    # A replica of the first deployment (same database, its own data folder) is welcome.
    replica = server(tmp_path, "replica", "first.db", namespace=namespace)
    servers += [first, other, replica]
    first.start()
    other.launch()
    line = refusal(other)
    assert line.startswith("fleet-server: --mqtt-namespace: ")
    assert f"namespace {namespace!r}" in line and "belongs to another deployment" in line
    assert str(tmp_path / "first.db") in line  # names the deployment holding it
    replica.start()
    assert first.alive and replica.alive
    # Two deployments that start at the same moment both find the namespace free: the
    # running ones hear of the later claim, and say so.
    forged = {"deployment": "f" * 32, "database": "sqlite:/elsewhere.db", "replica": "x"}
    paho_publish.single(
        f"edgefleet/v1/{namespace}/server/claim",
        json.dumps({**forged, "claimed_at": 1.0}),
        qos=1,
        retain=True,
        hostname="127.0.0.1",
    )
    for running in (first, replica):
        wait_until(
            f"{running.replica_id} to report the other claim",
            lambda r=running: "another deployment (sqlite:/elsewhere.db) claimed" in r.log(),
        )


def test_a_second_live_replica_with_the_same_replica_id_is_refused(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    name = f"r-{secrets.token_hex(3)}"
    one = server(tmp_path, name, "fleet.db")
    twin = ServerProcess(
        tmp_path / "twin",
        db_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        broker=SHARED_BROKER,
        replica_id=name,
    )
    servers += [one, twin]
    one.start()
    twin.launch()
    line = refusal(twin)
    assert line.startswith("fleet-server: --replica-id: ")
    assert f"replica id {name!r}" in line and "already uses" in line
    assert one.alive
    # A replica whose host froze keeps its connection open but answers nothing: the broker
    # has not sent its last will, and a restart under the same id takes over.
    assert one.proc is not None
    one.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = restart(tmp_path / "frozen", name)
        servers.append(frozen)
        frozen.start()
        assert "does not answer; taking over" in frozen.log()
    finally:
        one.kill()  # SIGKILL reaches a stopped process
    # A replica that died (the broker sends its last will) is replaced by its
    # supervisor's restart under the same id.
    frozen.kill()
    again = restart(tmp_path / "again", name)
    servers.append(again)
    again.start()
    assert again.alive


def twin_record(namespace: str, name: str, instance: str) -> None:
    """Announce, as a twin that started at the same moment would, that ``name`` is in use."""
    record = {"deployment": "twin", "instance": instance, "online": True, "at": time.time()}
    paho_publish.single(
        server_topic(namespace, f"replicas/{name}"),
        json.dumps(record),
        qos=1,
        retain=True,
        hostname="127.0.0.1",
        port=1883,
    )


@pytest.mark.parametrize("twin_is_lower", [True, False])
def test_twins_that_both_passed_the_check_settle_on_one(
    tmp_path: Path, servers: list[ServerProcess], twin_is_lower: bool
) -> None:
    # Two replicas started with one id at the same moment both find it free. Each then sees
    # the other's record: the lower instance id keeps the id, the other stops, naming the flag.
    name = f"twin-{secrets.token_hex(3)}"
    one = server(tmp_path, name, "fleet.db")
    servers.append(one)
    one.start()
    twin_record(one.namespace, name, "0" * 16 if twin_is_lower else "z" * 16)
    if twin_is_lower:
        line = refusal(one)
        assert line.startswith("fleet-server: --replica-id: ") and "this replica stops" in line
        return
    wait_until("the replica to reclaim its id", lambda: "this one keeps the id" in one.log())
    observe_for(1.0, lambda: not one.alive)
    assert one.alive


def restart(workdir: Path, name: str) -> ServerProcess:
    """A replica of the test's deployment (``fleet.db`` in the test's folder) named ``name``."""
    return ServerProcess(
        workdir,
        db_url=f"sqlite:///{workdir.parent / 'fleet.db'}",
        broker=SHARED_BROKER,
        replica_id=name,
    )


def run_server(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet_server.cli", "--data", str(tmp_path / "data"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:18883", "has no scheme"),
        ("tcp://127.0.0.1:1883", "unknown scheme 'tcp'"),
        ("mqtt://127.0.0.1:port", "the port must be a number"),
        ("mqtt://127.0.0.1:{free}", "cannot connect to the broker"),
    ],
)
def test_a_broker_url_the_server_cannot_use_is_one_line_naming_the_flag(
    tmp_path: Path, url: str, message: str
) -> None:
    url = url.replace("{free}", str(free_port()))
    done = run_server(tmp_path, "--mqtt", url, "--http", f"127.0.0.1:{free_port()}")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("fleet-server: ")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fleet-server: --mqtt: ") and message in lines[0]


def test_a_ca_file_the_server_cannot_read_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    url = f"mqtts://127.0.0.1:{free_port()}"
    done = run_server(tmp_path, "--mqtt", url, "--mqtt-ca-file", str(tmp_path / "missing.pem"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("fleet-server: ")]
    assert len(lines) == 1 and lines[0].startswith("fleet-server: --mqtt-ca-file: "), lines


def test_an_unsafe_namespace_is_refused_naming_the_flag(tmp_path: Path) -> None:
    done = run_server(tmp_path, "--mqtt", SHARED_BROKER, "--mqtt-namespace", "plant/#")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("fleet-server: --mqtt-namespace: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_fleetctl_shows_the_namespace_a_registered_device_must_use(
    tmp_path: Path, servers: list[ServerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    one = server(tmp_path, f"reg-{secrets.token_hex(3)}", "fleet.db")
    servers.append(one)
    one.start()
    one.admin_token()
    remote = ["--server", one.url, "--token-file", str(one.data / "admin.token")]
    argv = ["devices", "register", "pump-1", "--hardware", HARDWARE, *remote]
    assert fleetctl.main(argv) == 0
    out = capsys.readouterr().out
    assert f"MQTT namespace (agent.toml, [mqtt] namespace): {one.namespace}" in out
