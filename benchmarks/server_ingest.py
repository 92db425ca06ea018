"""Ingest throughput of a real ``fleet-server`` against a bare paho subscriber, in one run.

Two streams, each measured on its own (``--stream messages``, the default, or
``--stream windows``):

- *messages*: :class:`~protocol.messages.DeviceEvent` and
  :class:`~protocol.messages.Heartbeat` alternating, as JSON;
- *windows*: binary window summaries (:func:`protocol.window.encode_window`)
  on ``edgefleet/v1/{namespace}/devices/{id}/windows``. A few hundred distinct windows are
  recorded first with the agent's :class:`~agent.telemetry.WindowRecorder`
  over the sample model's bundle (``v2.tflite``, 16 features, the agent's
  window policy, single-row requests of generated data scored by the model);
  each message is one of them under a fresh window id and its device's id,
  dated two hours back (``WINDOW_AGE_S``), encoded. The server decodes and
  checks every window, stores it raw, and after each commit publishes an ack
  on each sending device's ``acks`` topic; the benchmark listens there and
  checks that every window is acknowledged exactly once.

Every consumer drains the same kind of backlog from the same broker: a
publisher process puts the round's stream from ``DEVICES`` registered
devices, at QoS 1, into the broker while the consumer is connected and
subscribed but stopped (``SIGSTOP``), so the broker holds it in the
consumer's session queue; the consumer is then resumed (``SIGCONT``) and
timed until the last message has landed. This times the consumer alone, not
the publisher.

- *paho*: a plain ``paho.mqtt.client`` subscribed at QoS 1 to the server's
  shared-subscription filters, counting messages and nothing else; it takes
  the time of its last message itself. The baseline.
- *aiomqtt*: the same through aiomqtt on an event loop, the MQTT library the
  server uses: the floor of any ingest built on it.
- *gate*: the paho subscriber that also passes each message through the
  server's gate (:func:`fleet_server.mqtt.ingest.classify`: topic, size, and
  for a window its head read and checked whole) and stores nothing: the
  floor of any ingest that checks what it stores, before a row is written
  or an ack sent.
- *server*: ``fleet-server --data DIR --db URL --mqtt URL`` as a user runs it,
  with its shared subscription, the devices registered through
  ``POST /api/v1/devices``. The stream ends with a message that leaves a row
  (an event, a window) and one replica writes its batches in the order it
  received them, so the stream has landed when that row is in the database;
  the benchmark looks it up every ``POLL_S`` on a connection of its own (not
  through the server, which the polling would slow). The server's ingest
  counter must then have counted exactly the stream, nothing dropped, and
  after the last round the rows are checked against what was published (one
  ``device_events`` row per event, or one ``windows`` row per window holding
  the bytes sent, each exactly once; every device seen).

Each consumer runs as its own process only during its own rounds, so it
never sees another's stream; the order of the four rotates from round to
round. The rounds' streams are written once and drained on each database.
The broker is a private Mosquitto on a free port, with Mosquitto's defaults
except a session queue large enough for the backlog (its default, 1000
queued messages per client, would drop most of it). The run is repeated for
SQLite and for a temporary PostgreSQL database (``EDGEFLEET_BENCH_POSTGRES``
names the server, default ``postgresql://postgres@127.0.0.1:5432``).

``--decode`` times the window readers alone, in one process, on the same
recorded windows: :func:`~protocol.window.decode_window_head` (what ingest
reads: the window checked whole, made without its features),
:func:`~protocol.window.decode_window`, and the reference reader that reads
a body value by value and builds a summary per feature (the decoder as it was
before the bulk reader; both readers fall back to it for what they cannot
vouch for). The readers alternate round by round; CPU time per window,
medians of ``DECODE_ROUNDS`` rounds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import urllib3
from paho.mqtt.enums import CallbackAPIVersion

from protocol.messages import DeviceEvent, Heartbeat, WindowAck
from protocol.topics import (
    acks_topic,
    device_topic,
    devices_root,
    ingest_subscriptions,
    server_topic,
)
from protocol.window import WindowSummary, decode_window, encode_window
from testbed import waiting
from testbed.server_process import clear_retained, private_broker
from testbed.waiting import free_port

# The benchmark server's topic namespace (on a broker of the benchmark's own).
NS = "bench"

DEVICES = 500
MESSAGES = 15_000  # per round and consumer
WARM_UP = 3_000  # messages of the first round, not counted
WINDOWS = 4_000  # per round and consumer: the server takes about a millisecond a window
WINDOWS_WARM_UP = 500
DISTINCT_WINDOWS = 200  # recorded windows the stream cycles through
# Windows are dated this far back: beyond the hour the server's drift job reads at start
# and every minute, which would otherwise load each round's growing pile of rows meanwhile.
WINDOW_AGE_S = 2 * 3600.0
ROUNDS = 3  # per database, after the warm-up round
POLL_S = 0.005
ACK_WAIT_S = 30.0
HARDWARE = "bench-hw"
GOAL = 0.3
WINDOW_GOAL = 0.25
DECODE_ROUNDS = 15
DECODE_PASSES = 5  # passes over the recorded windows per reader and round
SERVER_COMMAND = [sys.executable, "-m", "fleet_server.cli"]
RECORDED_WINDOWS = (
    Path(os.environ["EDGEFLEET_BENCH_WINDOWS"])
    if os.environ.get("EDGEFLEET_BENCH_WINDOWS")
    else None
)
POSTGRES_SERVER = os.environ.get("EDGEFLEET_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")

_INGESTED = re.compile(r"^edgefleet_mqtt_messages_ingested_total\{[^}]*\} (\S+)$", re.M)
_DROPPED = re.compile(r"^edgefleet_mqtt_messages_dropped_total\{[^}]*\} (\S+)$", re.M)


def wait_until(
    what: str, probe: Callable[[], object], timeout: float = 60.0, every: float = 0.05
) -> object:
    """:func:`testbed.waiting.wait_until`, failing the benchmark with a RuntimeError."""
    return waiting.wait_until(what, probe, timeout, every=every, failure=RuntimeError)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the broker --------------------------------------------------------------


@contextlib.contextmanager
def private_mosquitto(workdir: Path) -> Iterator[int]:
    """A Mosquitto of our own on a free port; yields the port."""
    # Room for the whole backlog; everything else is Mosquitto's default.
    with private_broker(workdir, [f"max_queued_messages {MESSAGES * 4}"]) as broker:
        yield int(broker.url.rsplit(":", 1)[1])


# -- the databases -------------------------------------------------------------


async def _postgres_admin(statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(f"{POSTGRES_SERVER}/postgres", timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def database(kind: str, directory: Path) -> Iterator[str]:
    """The URL of an empty database: a SQLite file, or a temporary PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'fleet.db'}"
        return
    name = f"edgefleet_bench_{secrets.token_hex(6)}"
    asyncio.run(_postgres_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        asyncio.run(_postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class RowLookup:
    """A connection of the benchmark's own to the server's database, for cheap lookups."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url

    def __enter__(self) -> RowLookup:
        if self.db_url.startswith("sqlite:///"):
            self._sqlite = sqlite3.connect(self.db_url.removeprefix("sqlite:///"))
        else:
            import asyncpg

            self._loop = asyncio.new_event_loop()
            self._pg = self._loop.run_until_complete(asyncpg.connect(self.db_url))
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.db_url.startswith("sqlite:///"):
            self._sqlite.close()
        else:
            self._loop.run_until_complete(self._pg.close())
            self._loop.close()

    def fetch(self, sql: str, *args: object) -> Any:
        """The first column of the first row (``None`` if there is none)."""
        if self.db_url.startswith("sqlite:///"):
            row = self._sqlite.execute(sql.replace("$1", "?"), args).fetchone()
            return row[0] if row else None
        return self._loop.run_until_complete(self._pg.fetchval(sql, *args))

    def column(self, sql: str) -> list[Any]:
        """The first column of every row."""
        if self.db_url.startswith("sqlite:///"):
            return [row[0] for row in self._sqlite.execute(sql)]
        return [row[0] for row in self._loop.run_until_complete(self._pg.fetch(sql))]

    def has_row(self, table: str, key: str, value: str) -> bool:
        return self.fetch(f"SELECT 1 FROM {table} WHERE {key} = $1", value) is not None


# -- the stream ----------------------------------------------------------------


Message = tuple[str, bytes, str | None]  # topic, payload, the key of the row it leaves


@dataclass(frozen=True)
class Stream:
    """A file of ``topic<TAB>base64 payload`` lines to publish, and what it holds."""

    path: Path
    messages: int
    payload_bytes: int
    # The keys of the rows the stream leaves in the server's database (event
    # message ids, window ids), in order; the last message leaves the last row.
    keys: list[str]


def write_stream(path: Path, messages: Iterable[Message]) -> Stream:
    """Write ``messages`` to ``path`` for :func:`publish`."""
    count = size = 0
    keys = []
    with path.open("w") as f:
        for topic, payload, key in messages:
            f.write(f"{topic}\t{base64.b64encode(payload).decode()}\n")
            count += 1
            size += len(payload)
            if key is not None:
                keys.append(key)
    return Stream(path, count, size, keys)


def device_messages(device_ids: list[str], tag: str, messages: int) -> Iterator[Message]:
    """``messages`` messages, events and heartbeats alternating, the last one an event."""
    now = time.time()
    for i in range(messages):
        device_id = device_ids[i % len(device_ids)]
        message_id = f"{tag}-{i:07d}"
        key: str | None = None
        if (messages - 1 - i) % 2 == 0:
            key = message_id
            message: DeviceEvent | Heartbeat = DeviceEvent(
                device_id=device_id,
                message_id=message_id,
                sent_at=now,
                event="inference.window",
                at=now,
                details={"window": i, "served": 120, "fallbacks": 0},
            )
            topic = device_topic(NS, device_id, "events")
        else:
            message = Heartbeat(
                device_id=device_id,
                message_id=message_id,
                sent_at=now,
                uptime_s=float(i),
                served={"pump-health": i},
            )
            topic = device_topic(NS, device_id, "heartbeat")
        yield topic, message.model_dump_json().encode(), key


def device_windows(
    recorded: list[WindowSummary], device_ids: list[str], tag: str, windows: int
) -> Iterator[Message]:
    """``windows`` encoded windows: the ``recorded`` in turn, each with a new id and its device.

    They are dated ``WINDOW_AGE_S`` back.
    """
    for i in range(windows):
        device_id = device_ids[i % len(device_ids)]
        window_id = f"{tag}-{i:07d}"
        template = recorded[i % len(recorded)]
        window = template.model_copy(
            update={
                "window_id": window_id,
                "device_id": device_id,
                "start": template.start - WINDOW_AGE_S,
                "end": template.end - WINDOW_AGE_S,
            }
        )
        yield device_topic(NS, device_id, "windows"), encode_window(window), window_id


def record_windows(count: int) -> list[WindowSummary]:
    """``count`` windows of the sample model, recorded the way the agent records them.

    Single-row requests of generated sensor data, scored by the model on an
    interpreter, timed, and folded into the window under the agent's policy.
    """
    # Imported here: the publisher and subscriber processes need none of it.
    import numpy as np

    from agent.telemetry import WindowRecorder
    from benchmarks.telemetry import AGENT_POLICY, Bare, sample_bundle
    from firmware_images.datagen import generate

    built, model_path = sample_bundle()
    model = Bare(model_path, rows=1)
    recorder = WindowRecorder(built.manifest, "recording", AGENT_POLICY)
    rng = np.random.default_rng(20)
    windows: list[WindowSummary] = []
    while len(windows) < count:
        rows, _labels = generate(AGENT_POLICY.max_requests, rng)
        for row in rows.astype(np.float32)[:, None, :]:
            started = time.perf_counter()
            scores = model(row)
            recorder.record(
                {"features": row}, {"scores": scores}, "active", time.perf_counter() - started
            )
        while (window := recorder.poll()) is not None:
            windows.append(window)
    return windows[:count]


def _paho_client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)


def publish(port: int, stream: Path) -> None:
    """Publish every line of ``stream`` at QoS 1; return once the broker acknowledged all."""
    lines = [line.split("\t", 1) for line in stream.read_text().splitlines()]
    payloads = [(topic, base64.b64decode(payload)) for topic, payload in lines]
    client = _paho_client(f"bench-publisher-{os.getpid()}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    acked = 0
    done = threading.Event()

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1
        if acked == len(lines):
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    for topic, payload in payloads:
        client.publish(topic, payload, qos=1)
    if not done.wait(120):
        raise SystemExit(f"the broker acknowledged {acked} of {len(lines)} messages")
    client.disconnect()
    client.loop_stop()


def count(port: int, expect: int, *, gate: bool = False) -> None:
    """The bare consumer: subscribe like the server, count ``expect`` messages, print the time.

    With ``gate``, each message first passes the server's gate, which must accept it.
    """
    from fleet_server.config import ServerConfig
    from fleet_server.mqtt.ingest import Accepted, classify

    max_bytes = ServerConfig.model_fields["max_message_bytes"].default
    client = _paho_client(f"bench-{'gate' if gate else 'paho'}-{os.getpid()}")
    topics = ingest_subscriptions(NS, shared=True)
    subscribed, done = threading.Event(), threading.Event()
    received = 0

    def on_connect(c, _userdata, _flags, _reason, _properties) -> None:  # type: ignore[no-untyped-def]
        c.subscribe([(t, 1) for t in topics])

    def on_subscribe(*_args: object) -> None:
        subscribed.set()

    def on_message(_client, _userdata, message) -> None:  # type: ignore[no-untyped-def]
        nonlocal received
        if gate:
            verdict = classify(message.topic, message.payload, max_bytes, namespace=NS)
            if not isinstance(verdict, Accepted):
                raise SystemExit(f"the gate refused a message: {verdict}")
        received += 1
        if received == expect:
            print(f"done {time.monotonic()!r}", flush=True)
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(30):
        raise SystemExit("no SUBACK from the broker")
    print("ready", flush=True)
    done.wait()
    client.disconnect()
    client.loop_stop()


def count_aiomqtt(port: int, expect: int) -> None:
    """The same as :func:`count` through aiomqtt, the server's MQTT library, on an event loop."""
    import aiomqtt

    async def consume() -> None:
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier=f"bench-aiomqtt-{os.getpid()}", keepalive=60
        ) as client:
            for topic in ingest_subscriptions(NS, shared=True):
                await client.subscribe(topic, qos=1)
            print("ready", flush=True)
            received = 0
            async for _message in client.messages:
                received += 1
                if received == expect:
                    print(f"done {time.monotonic()!r}", flush=True)
                    return

    asyncio.run(consume())


def _helper(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.server_ingest", *args]


def run_publisher(port: int, stream: Path) -> float:
    started = time.perf_counter()
    subprocess.run(_helper("--publish", str(port), str(stream)), check=True)
    return time.perf_counter() - started


# -- the consumers ---------------------------------------------------------------


@dataclass
class Drain:
    """One consumer draining one backlog."""

    messages: int
    payload_bytes: int
    seconds: float
    cpu_s: float
    publish_s: float
    acked_s: float | None = None  # until the last window ack reached the devices' side

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def byte_rate(self) -> float:
        return self.payload_bytes / self.seconds

    @property
    def cpu_us(self) -> float:
        """CPU time of the consumer process per message."""
        return self.cpu_s / self.messages * 1e6


def drain_subscriber(port: int, stream: Stream, library: str) -> Drain:
    """A subscriber process (``paho``, ``aiomqtt`` or ``gate``) draining ``stream``."""
    proc = subprocess.Popen(
        _helper(f"--count-{library}", str(port), str(stream.messages)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {library} subscriber did not subscribe")
        os.kill(proc.pid, signal.SIGSTOP)
        publish_s = run_publisher(port, stream.path)
        cpu_before = cpu_seconds(proc.pid)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGCONT)
        line = proc.stdout.readline().split()
        cpu = cpu_seconds(proc.pid) - cpu_before
        if not line or line[0] != "done":
            raise RuntimeError(f"the {library} subscriber did not receive the whole stream")
        ended = float(line[1])
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    return Drain(stream.messages, stream.payload_bytes, ended - started, cpu, publish_s)


@dataclass
class AckListener:
    """The devices' side of window acks: every ``acks`` topic, subscribed at QoS 1.

    Counts how often each window id is acknowledged and when the last ack came.
    """

    port: int
    acked: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    misaddressed: int = 0  # acks on another device's topic
    last: float = 0.0

    def __enter__(self) -> AckListener:
        subscribed = threading.Event()
        self._client = _paho_client(f"bench-acks-{os.getpid()}")

        def on_message(_client, _userdata, message) -> None:  # type: ignore[no-untyped-def]
            ack = WindowAck.model_validate_json(message.payload)
            if message.topic != acks_topic(NS, ack.device_id):
                self.misaddressed += 1
            self.acked.update(ack.window_ids)
            self.messages += 1
            self.last = time.monotonic()

        self._client.on_subscribe = lambda *_args: subscribed.set()
        self._client.on_message = on_message
        self._client.connect("127.0.0.1", self.port, keepalive=60)
        self._client.subscribe(f"{devices_root(NS)}/+/acks", qos=1)
        self._client.loop_start()
        if not subscribed.wait(30):
            raise RuntimeError("no SUBACK for the acks subscription")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def reset(self) -> None:
        self.acked, self.messages, self.misaddressed, self.last = Counter(), 0, 0, 0.0

    def wait_for(self, keys: list[str]) -> None:
        """Wait for an ack of every key; each must be acknowledged exactly once."""
        wait_until(
            "the window acks", lambda: sum(self.acked.values()) >= len(keys), ACK_WAIT_S, 0.01
        )
        time.sleep(0.1)  # an ack beyond the last would show up now
        if self.acked != Counter(keys) or self.misaddressed:
            extra = self.acked - Counter(keys)
            missing = Counter(keys) - self.acked
            raise RuntimeError(
                f"window acks differ from the windows sent: {sum(missing.values())} missing, "
                f"{sum(extra.values())} extra or repeated, {self.misaddressed} acks on "
                "another device's topic"
            )


class Server:
    """``fleet-server`` processes on one data folder and database."""

    def __init__(self, workdir: Path, db_url: str, port: int) -> None:
        self.data = workdir / "server"
        self.db_url = db_url
        self.broker_port = port
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(5, 30))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.http_port = free_port()
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                *SERVER_COMMAND,
                "--data",
                str(self.data),
                "--db",
                self.db_url,
                "--mqtt",
                f"mqtt://127.0.0.1:{self.broker_port}",
                "--mqtt-namespace",
                NS,
                "--http",
                f"127.0.0.1:{self.http_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"fleet-server exited; see {self.log}")
            try:
                return self.http.request("GET", f"{self.url}/healthz").status == 200
            except urllib3.exceptions.HTTPError:
                return False

        wait_until("the fleet server", healthy)
        self.token = (self.data / "admin.token").read_text().strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def register(self, device_ids: list[str]) -> None:
        for device_id in device_ids:
            r = self.http.request(
                "POST",
                f"{self.url}/api/v1/devices",
                body=json.dumps({"device_id": device_id, "hardware_id": HARDWARE}),
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Content-Type": "application/json",
                },
            )
            if r.status != 201:
                raise RuntimeError(f"registering {device_id}: {r.status} {r.data[:200]!r}")

    def counters(self) -> tuple[float, float]:
        """(messages ingested, messages dropped) since this process started."""
        text = self.http.request("GET", f"{self.url}/metrics").data.decode()
        return (
            sum(float(v) for v in _INGESTED.findall(text)),
            sum(float(v) for v in _DROPPED.findall(text)),
        )

    def drain(
        self, stream: Stream, workload: Workload, probe_device: str, acks: AckListener | None
    ) -> Drain:
        """Start a server, fill its queue while it is stopped, time it to the last message.

        The stream's last message leaves a row, and one replica writes its
        batches in the order it received them, so the stream has landed when
        that row is in the database; the ingest counter confirms it after.
        With ``acks``, every window must then be acknowledged exactly once.
        """
        self.start()
        assert self.proc is not None
        try:
            # The subscription is in place once a message goes all the way through.
            probe = Heartbeat(
                device_id=probe_device,
                message_id=f"probe-{secrets.token_hex(8)}",
                sent_at=time.time(),
                uptime_s=0.0,
            )
            probe_message = (
                device_topic(NS, probe_device, "heartbeat"),
                probe.model_dump_json().encode(),
                None,
            )
            probe_file = write_stream(stream.path.with_name("probe.txt"), [probe_message])
            run_publisher(self.broker_port, probe_file.path)
            wait_until("the probe message", lambda: self.counters()[0] >= 1, every=0.02)
            base, _ = self.counters()
            if acks is not None:
                acks.reset()
            with RowLookup(self.db_url) as db:
                os.kill(self.proc.pid, signal.SIGSTOP)
                publish_s = run_publisher(self.broker_port, stream.path)
                cpu_before = cpu_seconds(self.proc.pid)
                started = time.monotonic()
                os.kill(self.proc.pid, signal.SIGCONT)
                while not db.has_row(workload.table, workload.key, stream.keys[-1]):
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"fleet-server exited; see {self.log}")
                    time.sleep(POLL_S)
                ended = time.monotonic()
                cpu = cpu_seconds(self.proc.pid) - cpu_before
            acked_s = None
            if acks is not None:
                acks.wait_for(stream.keys)
                acked_s = acks.last - started
            # The server counts a batch just after its commit: give the last one a moment.
            deadline = time.monotonic() + 5
            ingested, dropped = self.counters()
            while ingested - base < stream.messages and time.monotonic() < deadline:
                time.sleep(0.02)
                ingested, dropped = self.counters()
            if ingested - base != stream.messages or dropped:
                raise RuntimeError(
                    f"the server ingested {ingested - base:.0f} of {stream.messages} messages "
                    f"and dropped {dropped:.0f}; see {self.log}"
                )
        finally:
            self.stop()
        return Drain(
            stream.messages, stream.payload_bytes, ended - started, cpu, publish_s, acked_s
        )


# -- the benchmark ---------------------------------------------------------------


CONSUMERS = ("paho", "aiomqtt", "gate", "server")


@dataclass(frozen=True)
class Workload:
    """One stream to measure: its messages, and the rows the server keeps of them."""

    title: str
    messages: int  # per round and consumer
    warm_up: int  # messages of the first round, not counted
    generate: Callable[[list[str], str, int], Iterator[Message]]
    table: str  # one row per key of the stream, keyed by ``key``
    key: str
    payload: str | None = None  # the column holding each message's bytes as sent
    acks: bool = False  # the server acknowledges every stored row to its device
    goal: float | None = None


def device_message_workload() -> Workload:
    return Workload(
        title=f"{MESSAGES:,} messages per round (events and heartbeats alternating)",
        messages=MESSAGES,
        warm_up=WARM_UP,
        generate=device_messages,
        table="device_events",
        key="message_id",
        goal=GOAL,
    )


def recorded_windows() -> list[WindowSummary]:
    """The windows to cycle through: recorded now, or read from a file of an earlier run.

    With ``EDGEFLEET_BENCH_WINDOWS`` naming a file, the windows recorded by the
    first run are written there and every later run reads them back, so runs of
    two trees one after the other drain the same windows (the recorder's sample
    depends on the model's timing, and the windows' size moves the decoder's share).
    """
    if RECORDED_WINDOWS is not None and RECORDED_WINDOWS.exists():
        lines = RECORDED_WINDOWS.read_text().split()
        return [decode_window(base64.b64decode(line)) for line in lines]
    recorded = record_windows(DISTINCT_WINDOWS)
    if RECORDED_WINDOWS is not None:
        RECORDED_WINDOWS.write_text(
            "".join(base64.b64encode(encode_window(w)).decode() + "\n" for w in recorded)
        )
    return recorded


def window_workload() -> Workload:
    recorded = recorded_windows()
    sizes = [len(encode_window(w)) for w in recorded]
    return Workload(
        title=(
            f"{WINDOWS:,} window summaries per round ({DISTINCT_WINDOWS} recorded, "
            f"{len(recorded[0].features)} features, {recorded[0].requests:,} requests each, "
            f"{statistics.median(sizes):.0f} B encoded, {min(sizes)}-{max(sizes)} B)"
        ),
        messages=WINDOWS,
        warm_up=WINDOWS_WARM_UP,
        generate=partial(device_windows, recorded),
        table="windows",
        key="window_id",
        payload="payload",
        acks=True,
        goal=WINDOW_GOAL,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "messages": device_message_workload,
    "windows": window_workload,
}


def check_stored(db_url: str, workload: Workload, streams: list[Stream]) -> int:
    """Every row the streams should leave is stored exactly once; returns how many there are."""
    with RowLookup(db_url) as db:
        keys = Counter(db.column(f"SELECT {workload.key} FROM {workload.table}"))
        seen = db.fetch("SELECT count(*) FROM devices WHERE last_seen_at IS NOT NULL")
        size = (
            db.fetch(f"SELECT sum(length({workload.payload})) FROM {workload.table}")
            if workload.payload
            else None
        )
    published = Counter(k for s in streams for k in s.keys)
    if keys != published or seen != DEVICES:
        raise RuntimeError(
            f"{workload.table}: {len(published - keys)} of {sum(published.values())} rows "
            f"missing, {sum((keys - published).values())} extra or repeated; "
            f"{seen} of {DEVICES} devices seen"
        )
    if size is not None and size != sum(s.payload_bytes for s in streams):
        raise RuntimeError(f"{workload.table}: {size} bytes stored, not the bytes sent")
    return sum(keys.values())


def run_database(
    kind: str,
    workdir: Path,
    port: int,
    workload: Workload,
    device_ids: list[str],
    streams: list[Stream],
) -> dict[str, object]:
    """The warm-up stream, then one round per further stream, every consumer, on one database.

    Each consumer drains every stream in turn; the order rotates from round to round.
    """
    # Each database is its own deployment: the last one's claim on the namespace goes first.
    clear_retained(server_topic(NS, "#"), ("127.0.0.1", port))
    with database(kind, workdir) as db_url:
        server = Server(workdir, db_url, port)
        server.start()
        started = time.perf_counter()
        server.register(device_ids)
        register_s = time.perf_counter() - started
        server.stop()
        drains: dict[str, list[Drain]] = {c: [] for c in CONSUMERS}
        with contextlib.ExitStack() as stack:
            acks = stack.enter_context(AckListener(port)) if workload.acks else None
            for r, stream in enumerate(streams):
                turn = r % len(CONSUMERS)
                for who in CONSUMERS[turn:] + CONSUMERS[:turn]:
                    if who == "server":
                        d = server.drain(stream, workload, device_ids[0], acks)
                    else:
                        d = drain_subscriber(port, stream, who)
                    if r:
                        drains[who].append(d)
        rows = check_stored(db_url, workload, streams)
    figures: dict[str, object] = {
        "register_per_device_ms": register_s / len(device_ids) * 1000,
        "publish_rate": statistics.median(
            d.messages / d.publish_s for ds in drains.values() for d in ds
        ),
        "rows_stored": rows,
    }
    for who, ds in drains.items():
        ratios = [d.rate / p.rate for d, p in zip(ds, drains["paho"], strict=True)]
        figures[who] = {
            "rate": statistics.median(d.rate for d in ds),
            "byte_rate": statistics.median(d.byte_rate for d in ds),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "cpu_us": statistics.median(d.cpu_us for d in ds),
        }
    if acks is not None:
        figures["acked_rate"] = statistics.median(
            d.messages / d.acked_s for d in drains["server"] if d.acked_s
        )
        figures["ack_messages"] = acks.messages
    return figures


def run(
    workload: Workload, databases: tuple[str, ...] = ("sqlite", "postgresql")
) -> dict[str, dict[str, object]]:
    """Measure and return the figures for each database.

    The streams are written once, for devices of the same ids registered in
    each database.
    """
    run_tag = secrets.token_hex(3)
    device_ids = [f"ingest-{run_tag}-{i:04d}" for i in range(DEVICES)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        streams = [
            write_stream(
                tmp / f"stream-{r}.txt",
                workload.generate(
                    device_ids, f"{run_tag}r{r}", workload.messages if r else workload.warm_up
                ),
            )
            for r in range(ROUNDS + 1)
        ]
        with private_mosquitto(tmp) as port:
            for kind in databases:
                workdir = tmp / kind
                workdir.mkdir()
                results[kind] = run_database(kind, workdir, port, workload, device_ids, streams)
    return results


LABELS = {
    "paho": "bare paho subscriber",
    "aiomqtt": "aiomqtt subscriber",
    "gate": "paho + the server's gate",
    "server": "fleet-server ingest",
}


def main(stream: str = "messages") -> None:
    workload = WORKLOADS[stream]()
    results = run(workload)
    print(
        f"{workload.title} from {DEVICES} devices, QoS 1; medians of {ROUNDS} rotating "
        f"rounds after a warm-up"
    )
    for kind, r in results.items():
        print(f"  {kind}:")
        for who in CONSUMERS:
            f: dict[str, Any] = r[who]  # type: ignore[assignment]
            line = (
                f"    {LABELS[who]:22} {f['rate']:9,.0f} msg/s {f['byte_rate'] / 1e6:6.2f} MB/s   "
                f"{f['ratio']:.2f}x   CPU {f['cpu_us']:5.0f} us/msg"
            )
            if who == "server":
                rounds = ", ".join(f"{x:.3f}" for x in f["ratios"])
                if workload.goal is None:
                    line += f"   no goal (rounds {rounds})"
                else:
                    met = "met" if f["ratio"] >= workload.goal else "NOT met"
                    line += f"   goal {workload.goal}x: {met} (rounds {rounds})"
            print(line)
        print(
            f"    publisher {r['publish_rate']:,.0f} msg/s; registration "
            f"{r['register_per_device_ms']:.1f} ms/device over REST; "
            f"{r['rows_stored']:,} {workload.table} rows stored, each exactly once"
        )
        if "acked_rate" in r:
            print(
                f"    every window acknowledged exactly once; to the last ack "
                f"{r['acked_rate']:,.0f} windows/s; {r['ack_messages']:,} ack messages "
                f"for the last round's {workload.messages:,} windows"
            )


def decode_only() -> dict[str, float]:
    """CPU microseconds per window of each window reader, medians of alternating rounds."""
    from protocol.window import codec, decode_window, decode_window_head

    def reference(data: bytes) -> object:
        version, body = codec._open(data)
        return codec._read_body(body, version, codec._read_features)

    readers: dict[str, Callable[[bytes], object]] = {
        "decode_window_head (ingest)": decode_window_head,
        "decode_window": decode_window,
        "reference reader (value by value)": reference,
    }
    encoded = [encode_window(w) for w in record_windows(DISTINCT_WINDOWS)]
    times: dict[str, list[float]] = {name: [] for name in readers}
    for r in range(DECODE_ROUNDS):
        order = list(readers.items())
        for name, read in order[r % 3 :] + order[: r % 3]:
            started = time.process_time()
            for _ in range(DECODE_PASSES):
                for data in encoded:
                    read(data)
            spent = time.process_time() - started
            times[name].append(spent / (DECODE_PASSES * len(encoded)) * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main_decode() -> None:
    figures = decode_only()
    base = figures["reference reader (value by value)"]
    print(
        f"window readers alone on {DISTINCT_WINDOWS} recorded windows, CPU per window; "
        f"medians of {DECODE_ROUNDS} alternating rounds"
    )
    for name, us in figures.items():
        print(f"  {name:36} {us:7.1f} us   {us / base:.2f}x the reference")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--publish":
        publish(int(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--count-paho":
        count(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--count-gate":
        count(int(sys.argv[2]), int(sys.argv[3]), gate=True)
    elif len(sys.argv) == 4 and sys.argv[1] == "--count-aiomqtt":
        count_aiomqtt(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--stream" and sys.argv[2] in WORKLOADS:
        main(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "--decode":
        main_decode()
    elif len(sys.argv) == 1:
        main()
    else:
        raise SystemExit(
            "usage: python -m benchmarks.server_ingest "
            f"[--stream {{{','.join(WORKLOADS)}}} | --decode]"
        )
