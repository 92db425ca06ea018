"""Assignments against a ``fleet-server`` process, driven by ``fleetctl`` processes, over MQTT.

What a device reports arrives over a real broker and the server's MQTT ingest;
what the server wants a device to run leaves as its retained desired state.
A tag rule reaches a device registered later, a cancel replaces the desired
state with one naming nothing, and a device's reported counter and refusal
events decide what ``assign`` refuses and what ``devices show`` warns about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet_server.fleetctl import main
from protocol.messages import BundleRef, DeviceEvent, ReportedState
from protocol.topics import desired_topic, device_topic
from protocol.versioning import default_release_counter
from testbed.images import HARDWARE
from testbed.server_process import DeviceClient, ServerProcess, private_broker, wait_until

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Desired:
    """Every desired-state message seen on the subscribed devices' topics, by device."""

    broker: str
    seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        host, _, port = self.broker.removeprefix("mqtt://").partition(":")
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex[:12])
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect(host, int(port), keepalive=30)
        self.client.loop_start()
        assert connected.wait(10), "could not connect to the broker"

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        if message.payload:
            body = json.loads(message.payload)
            with self._lock:
                self.seen.setdefault(body["device_id"], []).append(body)

    def watch(self, namespace: str, device_id: str) -> None:
        self.client.subscribe(desired_topic(namespace, device_id), qos=1)

    def latest(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            messages = self.seen.get(device_id) or []
            return messages[-1] if messages else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Setup:
    server: ServerProcess
    broker: str
    tmp: Path
    desired: Desired

    def fleetctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        token = self.server.data / "admin.token"
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "fleet_server.fleetctl",
                *args,
                "--server",
                self.server.url,
                "--token-file",
                str(token),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )

    def publish(self, device_id: str, message: ReportedState | DeviceEvent) -> None:
        channel = "state" if message.kind == "state" else "events"
        client = DeviceClient(self.broker, device_id)
        try:
            client.publish(
                device_topic(self.server.namespace, device_id, channel),
                message.model_dump_json().encode(),
            )
            client.flush()
        finally:
            client.close()

    def device(self, device_id: str) -> dict[str, Any]:
        return dict(self.server.api("GET", f"/devices/{device_id}", self.server.admin_token()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("announce")
    with private_broker(tmp / "broker") as broker:
        server = ServerProcess(tmp, db_url=None, broker=broker.url, replica_id="announce")
        desired = Desired(broker.url)
        try:
            server.start()
            keys, repo = tmp / "keys", tmp / "repo"
            assert main(["keys", "init", "--dir", str(keys)]) == 0
            for name in ("v1", "v2"):
                assert main(["release", "add", str(bundles[name]), "--repo", str(repo),
                             "--keys", str(keys)]) == 0  # fmt: skip
            s = Setup(server, broker.url, tmp, desired)
            pushed = s.fleetctl("release", "push", "--repo", str(repo))
            assert pushed.returncode == 0, pushed.stderr
            yield s
        finally:
            desired.close()
            server.stop()


def test_a_tag_rule_reaches_a_device_registered_later_and_a_cancel_names_nothing(
    setup: Setup,
) -> None:
    for device in ("an-1", "an-2"):
        setup.desired.watch(setup.server.namespace, device)
    made = setup.fleetctl("devices", "register", "an-1", "--hardware", HARDWARE, "--tag", "an")
    assert made.returncode == 0, made.stderr
    assigned = setup.fleetctl("assign", "pump-health@1.0.0", "--tag", "an", "--json")
    assert assigned.returncode == 0, assigned.stderr
    rule = json.loads(assigned.stdout)["rule"]
    wait_until("an-1's desired state", lambda: setup.desired.latest("an-1"))

    made = setup.fleetctl("devices", "register", "an-2", "--hardware", HARDWARE, "--tag", "an")
    assert made.returncode == 0, made.stderr
    first = wait_until("an-2's desired state", lambda: setup.desired.latest("an-2"))
    assert first["bundle"]["version"] == "1.0.0"
    assert first["director_version"] == setup.device("an-2")["director_version"]

    cancelled = setup.fleetctl("assignments", "cancel", rule)
    assert cancelled.returncode == 0, cancelled.stderr
    for device in ("an-1", "an-2"):
        cleared = wait_until(
            f"{device}'s desired state naming nothing",
            lambda d=device: (m := setup.desired.latest(d)) and m["bundle"] is None and m,
        )
        view = setup.device(device)
        assert view["assigned_target"] is None
        assert cleared["director_version"] == view["director_version"]


def test_a_reported_counter_refuses_a_lower_assignment_and_a_refusal_is_shown(
    setup: Setup,
) -> None:
    c2 = default_release_counter("2.0.0")
    made = setup.fleetctl("devices", "register", "mq-1", "--hardware", HARDWARE)
    assert made.returncode == 0, made.stderr
    assert setup.fleetctl("assign", "pump-health@1.0.0", "--device", "mq-1").returncode == 0
    now = time.time()
    setup.publish(
        "mq-1",
        ReportedState(
            device_id="mq-1",
            message_id=uuid.uuid4().hex,
            sent_at=now,
            agent_version="0.1.0",
            hardware_id=HARDWARE,
            active=BundleRef(name="pump-health", version="2.0.0", release_counter=c2),
            installed_counter=c2,
            phase="idle",
        ),
    )
    setup.publish(
        "mq-1",
        DeviceEvent(
            device_id="mq-1",
            message_id=uuid.uuid4().hex,
            sent_at=now,
            event="check-refused",
            at=now,
            details={
                "reason": "release-counter-downgrade",
                "message": f"pump-health 1.0.0 has release counter "
                f"{default_release_counter('1.0.0')}, below the installed {c2}",
            },
        ),
    )
    wait_until("mq-1's report", lambda: setup.device("mq-1")["installed_counter"] == c2)
    wait_until("mq-1's refusal", lambda: setup.device("mq-1")["refusals"])

    shown = setup.fleetctl("devices", "show", "mq-1")
    assert shown.returncode == 0, shown.stderr
    assert "WARNING: mq-1 refused the assigned pump-health 1.0.0" in shown.stdout
    refused = setup.fleetctl("assign", "pump-health@1.0.0", "--device", "mq-1")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"mq-1 runs pump-health 2.0.0 (release counter {c2})" in refused.stderr
