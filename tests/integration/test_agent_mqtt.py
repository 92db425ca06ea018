"""The agent's MQTT link against real Mosquitto brokers and real agent processes.

The shared broker at 127.0.0.1:1883 must be running (the tests fail, not skip,
without it). Each test uses its own device id, so retained messages of one test
never reach another, and clears the retained messages it caused at the end.
Outages are played on private ``mosquitto`` processes on free ports.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import paho.mqtt.publish as paho_publish
import pytest
import urllib3
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig, ConfigError
from agent.mqtt import Backoff
from agent.mqtt.reports import IgnoredDesiredState, device_event, parse_desired
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle
from protocol.messages import (
    DEVICE_MESSAGE,
    DesiredState,
    DeviceEvent,
    ReportedState,
    freeform_problem,
)
from protocol.topics import desired_topic, device_prefix, device_topic
from testbed.fleet import HARDWARE, AgentProcess, Fleet
from testbed.images import make_bundle
from testbed.waiting import observe_for

pytestmark = pytest.mark.integration

# This run's own namespace: other fleets on the shared broker never meet its topics.
NS = f"agent-test-{secrets.token_hex(4)}"
SHARED_PORT = 1883
FIELD_ROW = [1500.0, 10, 20, 40, 40, 1, 1, 1, 3, 3, 3, 0.5, 0.2, 0.1, 0.1, 60]
INSTALL_STEPS = ["download-started", "verified", "staging", "staged", "switched", "committed"]


# -- brokers and a listening test client --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Mosquitto:
    """A private ``mosquitto`` on ``port``; with ``store``, retained messages persist there.

    ``extra`` lines go into its configuration (more listeners, TLS, passwords).
    """

    def __init__(self, port: int, store: Path | None = None, extra: Sequence[str] = ()) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-mosquitto-"))
        lines = [f"listener {port} 127.0.0.1", *extra]
        if not any(line.startswith("allow_anonymous") for line in extra):
            lines.append("allow_anonymous true")
        if store is not None:
            # Mosquitto started as root drops to its own user, which must write here.
            os.chmod(store, 0o777)
            lines += ["persistence true", f"persistence_location {store}/"]
        (self.dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        self.log = (self.dir / "mosquitto.log").open("wb")
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.dir / "mosquitto.conf")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not _listening(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mosquitto did not start on {port}: {self.tail()}")
            time.sleep(0.02)

    def tail(self) -> str:
        return (self.dir / "mosquitto.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """Stop it (SIGTERM: a persistent broker saves its retained messages first)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Listener:
    """A test client that records everything published under one device's prefix."""

    def __init__(
        self,
        device_id: str,
        port: int = SHARED_PORT,
        auth: tuple[str, str] | None = None,
        namespace: str = NS,
    ) -> None:
        self.device_id = device_id
        self.namespace = namespace
        self.received: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex}")
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(f"{device_prefix(self.namespace, self.device_id)}/#", qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, bytes(message.payload), bool(message.retain)))

    def channel(self, channel: str) -> list[dict[str, Any]]:
        """The payloads received on one channel (empty ones, clears, left out)."""
        topic = f"{device_prefix(self.namespace, self.device_id)}/{channel}"
        with self._lock:
            return [json.loads(p) for t, p, _ in self.received if t == topic and p]

    def retained(self, channel: str) -> list[dict[str, Any]]:
        topic = f"{device_prefix(self.namespace, self.device_id)}/{channel}"
        with self._lock:
            return [json.loads(p) for t, p, r in self.received if t == topic and p and r]

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        with self._lock:
            seen = [(t.rsplit("/", 1)[1], p[:120]) for t, p, _ in self.received]
        raise AssertionError(f"timed out waiting for {what}; received {seen}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained_now(device_id: str, channel: str, port: int = SHARED_PORT) -> dict[str, Any]:
    """The retained message a client subscribing now gets on one of the device's channels."""
    late = Listener(device_id, port)
    try:
        late.wait_for(f"a retained {channel}", lambda: bool(late.retained(channel)), timeout=5)
        return late.retained(channel)[-1]
    finally:
        late.close()


def presence_is(listener: Listener, online: bool) -> Callable[[], bool]:
    return lambda: (
        bool(listener.channel("presence"))
        and (listener.channel("presence")[-1]["online"] is online)
    )


def publish(topic: str, payload: bytes, port: int = SHARED_PORT, retain: bool = True) -> None:
    paho_publish.single(topic, payload, qos=1, retain=retain, hostname="127.0.0.1", port=port)


def desired(device_id: str, director_version: int) -> bytes:
    message = DesiredState(
        device_id=device_id, director_version=director_version, issued_at=time.time()
    )
    return message.model_dump_json().encode()


def clear_retained(device_id: str) -> None:
    """Empty retained payloads: the broker forgets this device's retained messages."""
    for topic in (
        desired_topic(NS, device_id),
        device_topic(NS, device_id, "state"),
        device_topic(NS, device_id, "presence"),
    ):
        publish(topic, b"")


def make_ca(directory: Path, name: str) -> tuple[Path, Any, Any]:
    """A CA certificate (written to ``directory/name.pem``), its key and its name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgefleet test {name}")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(directory: Path, ca_key: Any, ca_cert: Any) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by the CA; returns (certificate, key) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def shared_broker() -> None:
    if not _listening(SHARED_PORT):
        pytest.fail(f"no MQTT broker at 127.0.0.1:{SHARED_PORT}: start Mosquitto there")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, KeyStore]:
    tmp = tmp_path_factory.mktemp("keys")
    return init_keys(tmp / "release"), init_keys(tmp / "director")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("built")
    return {"v1": make_bundle(tmp, "v1", "1.0.0"), "v2": make_bundle(tmp, "v2", "2.0.0")}


@pytest.fixture
def device() -> Iterator[str]:
    device_id = f"mqtt-{uuid.uuid4().hex[:10]}"
    yield device_id
    clear_retained(device_id)


@pytest.fixture
def fleet(tmp_path: Path, keys: tuple[KeyStore, KeyStore]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, *keys)
    yield f
    f.close()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agent processes to stop at the end, whatever happens."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


@pytest.fixture
def brokers() -> Iterator[list[Mosquitto]]:
    started: list[Mosquitto] = []
    yield started
    for broker in started:
        broker.stop()


def config(
    fleet: Fleet,
    device_id: str,
    port: int = SHARED_PORT,
    broker: str | None = None,
    mqtt: dict[str, Any] | None = None,
    **sections: Any,
) -> Path:
    """An agent.toml that beats and reconnects quickly; more sections in ``sections``."""
    update = {"health_period_s": 0.5, **sections.pop("update", {})}
    return fleet.agent_config(
        device_id,
        update=update,
        server={"broker": broker or f"mqtt://127.0.0.1:{port}"},
        mqtt={
            "namespace": NS,
            "heartbeat_interval_s": 0.3,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
            **(mqtt or {}),
        },
        **sections,
    )


def installed(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def assign(fleet: Fleet, device_id: str, bundle: ReleasedBundle) -> int:
    """Assign ``bundle``; returns the director version that says so."""
    return fleet.director.assign(fleet.director_keys, device_id, HARDWARE, bundle).version


# -- presence ---------------------------------------------------------------------------


def test_presence_is_retained_online_and_the_last_will_reports_a_killed_agent_offline(
    fleet: Fleet, device: str, agents: list[AgentProcess]
) -> None:
    fleet.director.register(fleet.director_keys, device)
    agent = AgentProcess(config(fleet, device))
    agents.append(agent)
    agent.wait_ready()
    listener = Listener(device)
    try:
        listener.wait_for("online presence", presence_is(listener, True))
        online = retained_now(device, "presence")  # what a server connecting now learns
        assert online["device_id"] == device and online["online"] is True
        assert len(online["message_id"]) == 32 and online["sent_at"] > 0
        assert DEVICE_MESSAGE.validate_python(online).kind == "presence"

        agent.kill()  # no goodbye: the broker publishes the last will
        listener.wait_for("the last will", presence_is(listener, False), timeout=10)
    finally:
        listener.close()
    offline = retained_now(device, "presence")
    assert offline["online"] is False and offline["message_id"] != online["message_id"]


def test_a_clean_shutdown_reports_offline_presence(
    fleet: Fleet, device: str, agents: list[AgentProcess]
) -> None:
    fleet.director.register(fleet.director_keys, device)
    agent = AgentProcess(config(fleet, device))
    agents.append(agent)
    agent.wait_ready()
    listener = Listener(device)
    try:
        listener.wait_for("online presence", presence_is(listener, True))
        assert agent.stop() == 0
        listener.wait_for("offline presence", presence_is(listener, False), timeout=5)
        assert "no clean goodbye" not in agent.tail()
    finally:
        listener.close()


def test_one_device_id_in_two_deployments_on_one_broker_keeps_both_connected(
    fleet: Fleet, device: str, agents: list[AgentProcess], keys: tuple[KeyStore, KeyStore]
) -> None:
    # Two fleets that happen to name a device alike: neither takes the other's MQTT
    # connection (one client id) nor sees the other's messages (one topic).
    other_ns = f"{NS}-other"
    other_fleet = Fleet(fleet.root / "other", *keys)
    listeners = [Listener(device), Listener(device, namespace=other_ns)]
    try:
        for f, namespace in ((fleet, NS), (other_fleet, other_ns)):
            f.director.register(f.director_keys, device)
            agent = AgentProcess(config(f, device, mqtt={"namespace": namespace}))
            agents.append(agent)
            agent.wait_ready()
        for listener in listeners:
            listener.wait_for("online presence", presence_is(listener, True))
            listener.wait_for(
                "5 heartbeats", lambda lis=listener: len(lis.channel("heartbeat")) >= 5
            )
        for agent in agents:
            assert agent.tail().count("mqtt: connected to") == 1, agent.tail()
            assert "no connection" not in agent.tail(), agent.tail()
    finally:
        for listener in listeners:
            listener.close()
        for agent in agents:
            agent.stop()
        other_fleet.close()
        for namespace in (NS, other_ns):
            for topic in (
                device_topic(namespace, device, "state"),
                device_topic(namespace, device, "presence"),
            ):
                publish(topic, b"")


# -- what the device reports ------------------------------------------------------------


def test_an_install_is_reported_as_events_state_and_heartbeats(
    fleet: Fleet, built: dict[str, Path], device: str, agents: list[AgentProcess]
) -> None:
    fleet.director.register(fleet.director_keys, device)
    agent = AgentProcess(config(fleet, device))
    agents.append(agent)
    url = agent.wait_ready()
    listener = Listener(device)
    try:
        listener.wait_for("the first state", lambda: bool(listener.channel("state")))
        first = ReportedState.model_validate(listener.channel("state")[0])
        assert first.active is None and first.phase == "idle"

        assign(fleet, device, fleet.release(built["v1"]))
        agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0")

        def committed_event() -> bool:
            return any(e["event"] == "committed" for e in listener.channel("events"))

        listener.wait_for("the committed event", committed_event)
        events = [DeviceEvent.model_validate(e) for e in listener.channel("events")]
        names = [e.event for e in events]
        assert [n for n in names if n in INSTALL_STEPS] == INSTALL_STEPS
        assert "self-test-passed" in names
        assert len({e.message_id for e in events}) == len(events)
        assert all(e.device_id == device for e in events)
        started = events[names.index("download-started")]
        assert started.details["bundle"] == "pump-health 1.0.0"
        assert started.details["phase"] == "downloading"
        switched = events[names.index("switched")]
        assert switched.details["slot"] in ("a", "b")
        assert "latency_p95_ms" in events[names.index("self-test-passed")].details

        def state_committed() -> bool:
            states = listener.channel("state")
            return (
                bool(states) and (states[-1].get("last_outcome") or {}).get("result") == "committed"
            )

        listener.wait_for("the committed state", state_committed)
        phases = [s["phase"] for s in listener.channel("state")]
        assert "trial" in phases  # the state follows the journal, step by step

        def served_by_active() -> int:
            beats = listener.channel("heartbeat")
            return int(beats[-1]["served"].get("active", 0)) if beats else 0

        before = served_by_active()
        assert agent.infer(url, [FIELD_ROW]).status == 200
        listener.wait_for("a heartbeat counting the request", lambda: served_by_active() > before)
        assert listener.channel("heartbeat")[-1]["uptime_s"] > 0
    finally:
        listener.close()

    state = ReportedState.model_validate(retained_now(device, "state"))
    assert state.active is not None and state.active.version == "1.0.0"
    assert state.active.sha256 is not None and len(state.active.sha256) == 64
    assert state.phase == "idle" and state.installed_counter == state.active.release_counter
    assert state.last_outcome is not None and state.last_outcome.result == "committed"
    assert state.hardware_id == HARDWARE


def test_the_reported_state_names_the_shadow_while_it_runs_and_leaves_it_out_otherwise(
    fleet: Fleet, built: dict[str, Path], device: str, agents: list[AgentProcess]
) -> None:
    from tuf.api.metadata import TargetFile

    from fleet_server.director.repository import assignment_custom
    from protocol.director_marks import SHADOW

    fleet.director.register(fleet.director_keys, device)
    agent = AgentProcess(config(fleet, device))
    agents.append(agent)
    agent.wait_ready()
    v1, v2 = fleet.release(built["v1"]), fleet.release(built["v2"])
    assign(fleet, device, v1)
    listener = Listener(device)

    def states() -> list[dict[str, Any]]:
        return listener.channel("state")

    try:
        listener.wait_for(
            "v1 active",
            lambda: any((s.get("active") or {}).get("version") == "1.0.0" for s in states()),
            timeout=120,
        )
        assert all("shadow" not in s for s in states()), "a state without a shadow names none"
        targets = {
            b.target_path: TargetFile(
                b.length,
                {"sha256": b.sha256},
                b.target_path,
                {"custom": {**assignment_custom(device, HARDWARE, b), **extra}},
            )
            for b, extra in ((v1, {}), (v2, {SHADOW: True}))
        }
        fleet.director.device(device).sign(fleet.director_keys, targets, None)
        listener.wait_for(
            "a state naming the shadow", lambda: bool(states()[-1].get("shadow")), timeout=120
        )
        shadow = ReportedState.model_validate(states()[-1]).shadow
        assert shadow is not None and (shadow.version, shadow.sha256) == ("2.0.0", v2.sha256)
        assert ReportedState.model_validate(retained_now(device, "state")).shadow == shadow

        assign(fleet, device, v1)  # the assignment alone: the shadow goes
        listener.wait_for(
            "a state without the shadow", lambda: "shadow" not in states()[-1], timeout=120
        )
    finally:
        listener.close()


# -- desired state ------------------------------------------------------------------


def test_malformed_and_foreign_desired_messages_are_ignored(
    fleet: Fleet, built: dict[str, Path], device: str, agents: list[AgentProcess]
) -> None:
    released = {k: fleet.release(v) for k, v in built.items()}
    assign(fleet, device, released["v1"])
    agent = AgentProcess(config(fleet, device, update={"poll_interval_s": 300}))
    agents.append(agent)
    agent.wait_ready()
    agent.wait_for("v1 committed (the poll at start)", lambda: installed(agent) == "1.0.0")
    listener = Listener(device)
    try:
        listener.wait_for("online presence", presence_is(listener, True))
        version = assign(fleet, device, released["v2"])  # no poll for 300 s ...
        topic = desired_topic(NS, device)
        foreign = desired("another-device", version)
        extra = json.loads(desired(device, version))
        extra["install_now"] = True
        for payload in (
            b"\xff not json",
            b"[]",
            foreign,
            json.dumps(extra).encode(),
            b'{"device_id": "' + device.encode() + b'"}',
        ):
            publish(topic, payload)
        # ... and none of those may cause one
        observe_for(1.5, lambda: agent.journal().get("phase") not in (None, "idle"))
        assert installed(agent) == "1.0.0" and agent.journal()["phase"] == "idle"
        assert agent.tail().count("mqtt: ignored a message") >= 5
        assert presence_is(listener, True)()

        publish(topic, desired(device, version))  # the real one does, and at once
        agent.wait_for("v2 committed", lambda: installed(agent) == "2.0.0", timeout=30)
    finally:
        listener.close()


def test_a_desired_state_retained_while_offline_installs_on_reconnect(
    fleet: Fleet,
    built: dict[str, Path],
    device: str,
    agents: list[AgentProcess],
    brokers: list[Mosquitto],
) -> None:
    port = _free_port()
    store = Path(tempfile.mkdtemp(prefix="edgefleet-retained-"))
    try:
        brokers.append(Mosquitto(port, store))
        # Not registered yet: the poll at start fails, and says so (an event over MQTT).
        agent = AgentProcess(config(fleet, device, port=port, update={"poll_interval_s": 300}))
        agents.append(agent)
        agent.wait_ready()
        listener = Listener(device, port)
        try:
            listener.wait_for(
                "the failed first check",
                lambda: any(e["event"].startswith("check-") for e in listener.channel("events")),
            )
        finally:
            listener.close()
        brokers.pop().stop()  # the device is offline from now on

        fleet.director.register(fleet.director_keys, device)
        version = assign(fleet, device, fleet.release(built["v1"]))
        # The server leaves its word retained on a broker the device cannot reach yet ...
        staging = Mosquitto(_free_port(), store)
        publish(desired_topic(NS, device), desired(device, version), port=staging.port)
        staging.stop()
        # ... which is there the moment the device's broker comes back.
        brokers.append(Mosquitto(port, store))
        back = time.monotonic()
        agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0", timeout=30)
        assert time.monotonic() - back < 30  # far within the 300 s poll interval
        assert "desired state changed" in agent.tail()
    finally:
        shutil.rmtree(store, ignore_errors=True)


# -- outages ------------------------------------------------------------------------


def test_with_the_broker_down_at_start_the_agent_serves_and_connects_later(
    fleet: Fleet, device: str, agents: list[AgentProcess], brokers: list[Mosquitto]
) -> None:
    fleet.director.register(fleet.director_keys, device)
    port = _free_port()  # nothing listens here yet
    agent = AgentProcess(config(fleet, device, port=port))
    agents.append(agent)
    url = agent.wait_ready()
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(2, 2))
    assert http.request("GET", f"{url}/v2/health/live").status == 200
    agent.wait_for("a failed connection", lambda: "mqtt: no connection" in agent.tail())
    assert http.request("GET", f"{url}/v2/health/live").status == 200

    brokers.append(Mosquitto(port))
    listener = Listener(device, port)
    try:
        listener.wait_for("online presence", presence_is(listener, True), timeout=10)
        listener.wait_for("reported state", lambda: bool(listener.channel("state")))
        listener.wait_for("a heartbeat", lambda: bool(listener.channel("heartbeat")))
    finally:
        listener.close()


def test_over_tls_with_a_password_the_agent_connects_and_refuses_a_broker_it_cannot_verify(
    fleet: Fleet, agents: list[AgentProcess], brokers: list[Mosquitto]
) -> None:
    files = Path(tempfile.mkdtemp(prefix="edgefleet-tls-"))
    try:
        os.chmod(files, 0o755)  # readable by the user mosquitto drops to
        ca, ca_key, ca_cert = make_ca(files, "ca")
        other_ca, _, _ = make_ca(files, "other-ca")
        cert, key = make_server_cert(files, ca_key, ca_cert)
        devices = [f"mqtt-{uuid.uuid4().hex[:10]}" for _ in range(2)]
        passwords = files / "passwords"
        for user in [*devices, "observer"]:
            subprocess.run(
                [
                    "mosquitto_passwd",
                    "-b",
                    *(["-c"] if not passwords.exists() else []),
                    str(passwords),
                    user,
                    f"{user}-secret",
                ],
                check=True,
                capture_output=True,
            )
        for f in (ca, cert, key, passwords):
            os.chmod(f, 0o644)
        tls_port = _free_port()
        broker = Mosquitto(
            _free_port(),
            extra=[
                "allow_anonymous false",
                f"password_file {passwords}",
                f"listener {tls_port} 127.0.0.1",
                f"cafile {ca}",
                f"certfile {cert}",
                f"keyfile {key}",
            ],
        )
        brokers.append(broker)
        for device, ca_file in zip(devices, (ca, other_ca), strict=True):
            fleet.director.register(fleet.director_keys, device)
            secret = fleet.root / f"{device}.password"
            secret.write_text(f"{device}-secret\n")
            agents.append(
                AgentProcess(
                    config(
                        fleet,
                        device,
                        broker=f"mqtts://127.0.0.1:{tls_port}",
                        mqtt={"ca_file": str(ca_file)},
                        credentials={"username": device, "password_file": str(secret)},
                    )
                )
            )
        trusting, doubting = agents
        trusting.wait_ready()
        doubting.wait_ready()
        listener = Listener(devices[0], broker.port, auth=("observer", "observer-secret"))
        try:
            listener.wait_for("online presence over TLS", presence_is(listener, True))
        finally:
            listener.close()
        doubting.wait_for(
            "a refused certificate", lambda: "CERTIFICATE_VERIFY_FAILED" in doubting.tail()
        )
        assert "mqtt: connected" not in doubting.tail()
    finally:
        shutil.rmtree(files, ignore_errors=True)


# -- the pure parts ---------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_its_ceiling_and_resets() -> None:
    lows = Backoff(1.0, 8.0, random_fraction=lambda: 0.0)
    assert [lows.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    highs = Backoff(1.0, 8.0, random_fraction=lambda: 1.0)
    assert [highs.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    highs.reset()
    assert highs.next_delay() == 1.0


def test_desired_state_for_another_device_or_malformed_is_refused_with_a_reason() -> None:
    ok = parse_desired("pump-1", desired("pump-1", 3))
    assert ok.director_version == 3
    with pytest.raises(IgnoredDesiredState, match="another-device"):
        parse_desired("pump-1", desired("another-device", 3))
    with pytest.raises(IgnoredDesiredState, match="not a desired state"):
        parse_desired("pump-1", b"{}")
    with pytest.raises(IgnoredDesiredState, match="not a desired state"):
        parse_desired("pump-1", b"\x00\xff")


def test_device_events_drop_empty_details_and_clip_long_messages() -> None:
    record = {"at": 5.0, "event": "refused", "reason": "x", "message": "m" * 5000, "slot": None}
    event = device_event("pump-1", record, sent_at=6.0)
    assert event.at == 5.0 and event.sent_at == 6.0 and event.event == "refused"
    assert set(event.details) == {"reason", "message"}
    assert len(event.details["message"]) == 2000
    assert event.message_id != device_event("pump-1", record, sent_at=6.0).message_id


def test_device_events_always_pass_the_servers_gate_whatever_the_installer_recorded() -> None:
    # 32 texts of multi-byte characters and control escapes, a long key, numbers JSON
    # cannot hold: the event must still be one the server stores, not an exception.
    record: dict[str, object] = {f"k{i}": "\u2603\x01" * 1500 for i in range(29)}
    record |= {"at": 1.0, "event": "refused", "k" * 5000: float("nan"), "big": 2**70}
    event = device_event("pump-1", record, sent_at=2.0)
    assert freeform_problem(event.details) is None
    assert event.details["big"] == str(2**70)
    assert "nan" in event.details.values()
    assert DeviceEvent.model_validate_json(event.model_dump_json()) == event


@pytest.mark.parametrize(
    "broker", ["http://127.0.0.1:1883", "mqtt://", "mqtt://host:99999", "mqtt://u:p@host"]
)
def test_a_broker_url_that_is_not_mqtt_host_port_is_refused_naming_the_field(
    fleet: Fleet, broker: str
) -> None:
    path = config(fleet, "pump-1", broker=broker)
    with pytest.raises(ConfigError, match=r"server\.broker: .*(mqtt|port)"):
        AgentConfig.load(path)


def test_an_unreadable_password_file_stops_the_agent_with_one_line(fleet: Fleet) -> None:
    path = config(fleet, "pump-1", credentials={"password_file": "missing.password"})
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 1
    assert "credentials.password_file: cannot read" in run.stderr
    assert "Traceback" not in run.stderr
