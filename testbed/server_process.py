"""Real ``fleet-server`` processes, a private broker for them, and device clients.

A :class:`ServerProcess` is ``python -m fleet_server.cli`` with its own data
folder and port; it is ready once ``/healthz`` answers and its MQTT link has
subscribed (the "MQTT connected; ingesting" line in its log). Tests read its
REST API and its Prometheus counters over HTTP, and may SIGKILL it.

:func:`private_broker` runs a Mosquitto of the test's own on a free port, for
tests that restart, fill or count the broker itself. Every deployment has its
own topic namespace (by default derived from its database, see
:attr:`ServerProcess.namespace`), so servers of other tests or demos on the
same broker never see our devices' messages.

:class:`DeviceClient` is a plain paho client that publishes as a device.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import urllib3
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.config import ServerConfig
from testbed.mosquitto import Mosquitto, running_mosquitto
from testbed.waiting import free_port, wait_until

__all__ = [
    "Broker",
    "DeviceClient",
    "ServerProcess",
    "clear_retained",
    "free_port",
    "private_broker",
    "wait_until",
]

# The servers are the fan-in of every device's messages. Past Mosquitto's default of 1000
# messages queued for one client it drops QoS 1 messages silently, so a fleet's broker must
# let the server's sessions queue a burst.
FAN_IN_LIMITS = ("max_queued_messages 100000",)
INGESTED = "edgefleet_mqtt_messages_ingested_total"
DROPPED = "edgefleet_mqtt_messages_dropped_total"
MQTT_READY_LINE = "MQTT connected; ingesting"
# How long a server may take to be ready. A fresh PostgreSQL database's migrations on a
# loaded two-core machine took over a minute; a server that never gets there still fails.
START_TIMEOUT_S = 180.0
# How long a SIGTERMed server has to stop cleanly before it is killed.
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class Broker:
    """A running private Mosquitto: where to connect, and what it logged."""

    url: str
    mosquitto: Mosquitto

    def log(self) -> str:
        return self.mosquitto.output()


@contextmanager
def private_broker(directory: Path, extra: Sequence[str] = ()) -> Iterator[Broker]:
    """A Mosquitto of this test's own on a free port: anonymous, ``extra`` configuration lines."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = directory / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest stderr", *extra]
    conf.write_text("\n".join(lines) + "\n")
    with running_mosquitto(conf, [port]) as mosquitto:
        yield Broker(f"mqtt://127.0.0.1:{port}", mosquitto)


class ServerProcess:
    """One ``fleet-server`` replica running as its own process."""

    def __init__(
        self,
        workdir: Path,
        *,
        db_url: str | None,
        broker: str,
        replica_id: str,
        namespace: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.replica_id = replica_id
        self.data = workdir / replica_id
        # What the server itself derives when no --mqtt-namespace is given.
        default_db = f"sqlite:///{self.data.resolve() / 'fleet.db'}"  # fleet-server's default
        self.namespace = (
            namespace or ServerConfig(data_dir=self.data, db_url=db_url or default_db).namespace
        )
        self.log_path = workdir / f"{replica_id}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "fleet_server.cli",
            "--data",
            str(self.data),
            *(("--db", db_url) if db_url else ()),
            "--mqtt",
            broker,
            "--http",
            f"127.0.0.1:{self.port}",
            "--replica-id",
            replica_id,
            *(("--mqtt-namespace", namespace) if namespace else ()),
            *extra_args,
        ]
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the process; return once its API answers and its ingest has subscribed."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process and return at once."""
        self.data.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the API answers and the ingest has subscribed; fail if the process exits."""

        def ready() -> bool:
            if not self.alive:
                raise AssertionError(
                    f"fleet-server {self.replica_id} exited with status "
                    f"{self.returncode} while starting:\n{self.log_tail()}"
                )
            return self.healthy() and MQTT_READY_LINE in self.log()

        wait_until(f"fleet-server {self.replica_id} to be ready", ready, timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def healthy(self) -> bool:
        try:
            return self.http.request("GET", f"{self.url}/healthz").status == 200
        except urllib3.exceptions.HTTPError:
            return False

    # -- the REST API --------------------------------------------------------

    def request(
        self, method: str, path: str, *, token: str | None = None, body: Any = None
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.request(method, self.url + path, json=body, headers=headers)

    def api(self, method: str, path: str, token: str, body: Any = None) -> Any:
        """``/api/v1`` + ``path``; its JSON answer, or an assertion error naming the status."""
        r = self.request(method, f"/api/v1{path}", token=token, body=body)
        if not 200 <= r.status < 300:
            raise AssertionError(
                f"{method} {path} on {self.replica_id}: {r.status} {r.data[:300]!r}"
            )
        return json.loads(r.data)

    def admin_token(self, timeout: float = 10.0) -> str:
        """The bootstrap admin token, if this replica was the one that created it."""
        path = self.data / "admin.token"
        wait_until(f"{path}", path.exists, timeout)
        return path.read_text().strip()

    # -- metrics ---------------------------------------------------------------

    def counter(self, name: str, label: str) -> dict[str, float]:
        """A counter's values by the value of its one ``label`` (e.g. ``reason``)."""
        r = self.http.request("GET", f"{self.url}/metrics")
        assert r.status == 200, f"/metrics on {self.replica_id}: {r.status}"
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(r.data.decode()):
            for sample in family.samples:
                if sample.name == name:
                    key = sample.labels[label]
                    values[key] = values.get(key, 0.0) + sample.value
        return values

    # -- stopping ----------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL: no clean MQTT disconnect, no flushing of the ingest queue."""
        if self.proc is not None and self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL only if it has not stopped within ``timeout`` seconds
        (default :data:`STOP_GRACE_S`).

        A clean stop leaves the share group and settles what is in flight, each
        bounded by the server's own timeouts; on a loaded machine that takes
        longer, and a test asserting a clean stop must not see a kill instead.
        """
        if self.proc is not None and self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_S if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]


class DeviceClient:
    """A paho client that publishes as one device (QoS 1 by default), connected on return."""

    def __init__(self, broker: str, device_id: str) -> None:
        host, _, port = broker.removeprefix("mqtt://").partition(":")
        self.device_id = device_id
        self._connected = threading.Event()
        self._pending: list[paho.MQTTMessageInfo] = []
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{device_id}-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = lambda *_: self._connected.set()
        self.client.connect(host, int(port or 1883), keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise AssertionError(f"{device_id} could not connect to {broker}")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        assert info.rc == paho.MQTT_ERR_SUCCESS, f"publish to {topic}: {paho.error_string(info.rc)}"
        self._pending.append(info)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the broker acknowledged everything published so far."""
        deadline = time.monotonic() + timeout
        for info in self._pending:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), f"{self.device_id}: the broker did not acknowledge"
        self._pending.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def clear_retained(topic_filter: str, broker: tuple[str, int] = ("127.0.0.1", 1883)) -> None:
    """Empty every retained message under ``topic_filter`` (say ``edgefleet/v1/NS/#``).

    The machine's broker keeps what a test's deployment retained (its claim,
    replica records, desired states) after the test; this leaves it clean.
    """
    retained: set[str] = set()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"cleanup-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
    client.on_message = lambda _c, _u, m: retained.add(m.topic) if m.retain else None
    client.connect(*broker, keepalive=10)
    client.loop_start()
    try:
        time.sleep(1.0)  # retained messages come right after the subscription
        for topic in sorted(retained):
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
