"""A broker that speaks only MQTT 3.1.1 (the embedded amqtt of the demo) still gets the ingest.

The server asks for MQTT 5 (persistent session with an expiry, Receive
Maximum); amqtt never answers such a CONNECT, so the server falls back to
3.1.1 with a persistent session and acknowledges after commit there too.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.messages import DeviceEvent
from protocol.topics import device_topic
from testbed.embedded_broker import listening
from testbed.mosquitto import free_port
from testbed.server_process import DeviceClient, ServerProcess, wait_until

pytestmark = [pytest.mark.integration]


@pytest.fixture
def amqtt_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.embedded_broker", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until("the embedded broker to listen", lambda: listening("127.0.0.1", port))
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_server_on_an_mqtt_311_broker_ingests_device_messages(
    tmp_path: Path, amqtt_url: str
) -> None:
    server = ServerProcess(
        tmp_path,
        db_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        broker=amqtt_url,
        replica_id=f"v311-{uuid.uuid4().hex[:6]}",
        extra_args=["--no-shared-subscription"],
    )
    server.start()
    device = DeviceClient(amqtt_url, "pump-311")
    try:
        token = server.admin_token()
        server.api("POST", "/devices", token, {"device_id": "pump-311", "hardware_id": "rpi4"})
        ids = [f"v311-event-{i:04d}" for i in range(50)]
        for message_id in ids:
            event = DeviceEvent(
                device_id="pump-311",
                message_id=message_id,
                sent_at=time.time(),
                event="test",
                at=time.time(),
            )
            device.publish(
                device_topic(server.namespace, "pump-311", "events"),
                event.model_dump_json().encode(),
            )
        device.flush()

        def stored() -> set[str]:
            events = server.api("GET", "/devices/pump-311/events?limit=100", token)["events"]
            return {e["message_id"] for e in events}

        wait_until("the 50 events to be stored", lambda: stored() >= set(ids))
        assert "MQTT 3.1.1 only" in server.log()
    finally:
        device.close()
        server.stop()
