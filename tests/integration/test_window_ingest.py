"""Window ingest end to end: a device's encoded windows, a real broker, a real server, acks back.

Each database (SQLite and PostgreSQL) gets one ``fleet-server`` process on a
private Mosquitto; the tests share it and use device ids of their own. A
device publishes :func:`protocol.window.encode_window` bytes on its
``windows`` topic and listens on its ``acks`` topic; the tests read the
``windows`` table directly and the server's counters over ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from fleet_server.db import Database
from fleet_server.db.models import WindowRow
from protocol.histogram import ExponentialHistogram, record
from protocol.messages import WindowAck
from protocol.summary import edges_id, quantile_edges, summarize
from protocol.topics import MAX_WINDOW_BYTES, acks_topic, devices_root, windows_topic
from protocol.window import WindowSummary, decode_window, encode_window
from testbed.server_process import (
    DROPPED,
    INGESTED,
    DeviceClient,
    ServerProcess,
    private_broker,
    wait_until,
)
from testbed.waiting import observe_for
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

HARDWARE = "rpi4-arm64"
MODELS = Path(__file__).resolve().parents[2] / "firmware_images" / "models"
BASELINE = np.load(MODELS / "baseline.npy").astype(np.float64)
EDGES = [quantile_edges(BASELINE[:, j]) for j in range(BASELINE.shape[1])]
# Long enough for a round trip through broker, batch and database; short enough to stay quick.
QUIET_S = 0.5


@dataclass
class Setup:
    server: ServerProcess
    broker: str
    db_url: str
    token: str

    def register(self, name: str) -> str:
        device_id = f"win-{secrets.token_hex(3)}-{name}"
        self.server.api(
            "POST", "/devices", self.token, {"device_id": device_id, "hardware_id": HARDWARE}
        )
        return device_id

    def dropped(self) -> dict[str, float]:
        return self.server.counter(DROPPED, "reason")

    def ingested_windows(self) -> float:
        return self.server.counter(INGESTED, "channel").get("windows", 0.0)

    def stored(self, device_id: str) -> list[WindowRow]:
        return asyncio.run(_stored(self.db_url, device_id))


async def _stored(db_url: str, device_id: str) -> list[WindowRow]:
    db = Database(db_url)
    try:
        async with db.session() as session:
            rows = await session.scalars(select(WindowRow).where(WindowRow.device_id == device_id))
            return list(rows.all())
    finally:
        await db.close()


@pytest.fixture(scope="module", params=DATABASES)
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp(f"windows-{request.param}")
    with private_broker(tmp / "broker") as broker, database_url(request.param, tmp) as db_url:
        server = ServerProcess(
            tmp, db_url=db_url, broker=broker.url, replica_id=f"windows-{secrets.token_hex(3)}"
        )
        try:
            server.start()
            yield Setup(server, broker.url, db_url, server.admin_token())
        finally:
            server.stop()


class AckListener:
    """A client that records every ack the server publishes on the broker."""

    def __init__(self, broker: str, namespace: str) -> None:
        host, _, port = broker.removeprefix("mqtt://").partition(":")
        self.namespace = namespace
        self.acks: list[tuple[str, WindowAck]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"acks-{uuid.uuid4().hex}")
        self.client.on_connect = lambda c, *_: c.subscribe(
            f"{devices_root(namespace)}/+/acks", qos=1
        )
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port), keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(10):
            self.close()
            raise AssertionError("the ack listener could not subscribe")

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        assert not message.retain, "acks are not retained"
        ack = WindowAck.model_validate_json(message.payload)
        with self._lock:
            self.acks.append((message.topic, ack))

    def acked(self, device_id: str) -> list[str]:
        """Every window id acked to ``device_id``, in order, repeats included."""
        with self._lock:
            return [
                i
                for topic, ack in self.acks
                if topic == acks_topic(self.namespace, device_id)
                for i in ack.window_ids
            ]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def acks(setup: Setup) -> Iterator[AckListener]:
    listener = AckListener(setup.broker, setup.server.namespace)
    try:
        yield listener
    finally:
        listener.close()


def window(
    device_id: str, rng: np.random.Generator, start: float = 1_700_000_000.0
) -> WindowSummary:
    rows = BASELINE[rng.choice(BASELINE.shape[0], 120)]
    return WindowSummary(
        window_id=uuid.uuid4().hex,
        device_id=device_id,
        model_name="pump-health",
        model_version="1.0.0",
        baseline_id=edges_id(EDGES),
        start=start,
        end=start + 60.0,
        requests=rows.shape[0],
        errors=1,
        served={"active": rows.shape[0]},
        features=summarize(rows, EDGES),
        latency_ms=record(ExponentialHistogram(), rng.lognormal(1.0, 0.5, rows.shape[0])),
    )


def publish(
    setup: Setup, device_id: str, payloads: list[bytes], topic_of: str | None = None
) -> None:
    client = DeviceClient(setup.broker, device_id)
    try:
        for payload in payloads:
            client.publish(windows_topic(setup.server.namespace, topic_of or device_id), payload)
        client.flush()
    finally:
        client.close()


def _epoch(at: datetime) -> float:
    # SQLite hands back the UTC time it stored without its zone.
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()


def increase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def test_stored_windows_are_acked_with_exactly_their_ids(setup: Setup, acks: AckListener) -> None:
    device = setup.register("pump")
    rng = np.random.default_rng(1)
    windows = [window(device, rng, 1_700_000_000.0 + 60 * i) for i in range(3)]
    encoded = {w.window_id: encode_window(w) for w in windows}
    ingested = setup.ingested_windows()

    publish(setup, device, list(encoded.values()))

    wait_until("acks for all three windows", lambda: set(acks.acked(device)) == set(encoded))
    observe_for(QUIET_S, lambda: len(acks.acked(device)) > len(encoded))  # a second ack
    assert sorted(acks.acked(device)) == sorted(encoded)  # each once, nothing else
    rows = {r.window_id: r for r in setup.stored(device)}
    assert set(rows) == set(encoded)
    for w in windows:
        row = rows[w.window_id]
        assert row.payload == encoded[w.window_id]
        # The codec keeps counts exactly (moments only to float32), so this is the window sent.
        assert [f.counts for f in decode_window(row.payload).features] == [
            f.counts for f in w.features
        ]
        assert (row.model_name, row.model_version, row.baseline_id) == (
            "pump-health",
            "1.0.0",
            w.baseline_id,
        )
        assert (row.requests, row.errors) == (w.requests, w.errors)
        assert (_epoch(row.start), _epoch(row.end)) == (w.start, w.end)
        assert row.ingested_by == setup.server.replica_id
    assert setup.ingested_windows() - ingested == 3
    shown = setup.server.api("GET", f"/devices/{device}", setup.token)
    assert shown["last_seen_at"] is not None


def test_a_resent_window_is_stored_once_and_acked_again(setup: Setup, acks: AckListener) -> None:
    device = setup.register("resend")
    w = window(device, np.random.default_rng(2))
    payload = encode_window(w)

    publish(setup, device, [payload])
    wait_until("the first ack", lambda: acks.acked(device) == [w.window_id])
    publish(setup, device, [payload])
    wait_until("the second ack", lambda: acks.acked(device) == [w.window_id, w.window_id])

    assert [r.window_id for r in setup.stored(device)] == [w.window_id]


def test_garbage_on_the_windows_topic_is_dropped_and_counted(
    setup: Setup, acks: AckListener
) -> None:
    device = setup.register("garbage")
    good = window(device, np.random.default_rng(3))
    encoded = encode_window(good)
    flipped = bytearray(encoded)
    flipped[len(flipped) // 2] ^= 0xFF
    before = setup.dropped()

    publish(
        setup,
        device,
        [
            b"not a window",
            json.dumps({"v": 1, "device_id": device}).encode(),
            encoded[: len(encoded) // 2],
            bytes(flipped),
            b"EFW\x01" + secrets.token_bytes(MAX_WINDOW_BYTES),
            encoded,  # sent last: once it is acked, everything before it was judged
        ],
    )

    wait_until("the good window's ack", lambda: acks.acked(device) == [good.window_id])
    assert increase(before, setup.dropped()) == {"malformed-window": 4, "oversized": 1}
    assert [r.window_id for r in setup.stored(device)] == [good.window_id]


def test_a_window_naming_another_device_is_dropped_as_spoofed(
    setup: Setup, acks: AckListener
) -> None:
    device, victim = setup.register("spoofer"), setup.register("victim")
    rng = np.random.default_rng(4)
    forged = window(victim, rng)  # published on the spoofer's own topic
    honest = window(device, rng)
    before = setup.dropped()

    publish(setup, device, [encode_window(forged), encode_window(honest)])

    wait_until("the honest window's ack", lambda: acks.acked(device) == [honest.window_id])
    observe_for(QUIET_S, lambda: acks.acked(victim) or len(acks.acked(device)) > 1)
    assert increase(before, setup.dropped()) == {"spoofed-device-id": 1}
    assert acks.acked(victim) == []
    assert setup.stored(victim) == []
    assert [r.window_id for r in setup.stored(device)] == [honest.window_id]


def test_windows_of_an_unregistered_device_are_dropped_and_not_acked(
    setup: Setup, acks: AckListener
) -> None:
    ghost = f"win-{secrets.token_hex(3)}-ghost"
    before = setup.dropped()

    publish(setup, ghost, [encode_window(window(ghost, np.random.default_rng(5)))])

    wait_until(
        "the window to be dropped",
        lambda: increase(before, setup.dropped()) == {"unknown-device": 1},
    )
    observe_for(QUIET_S, lambda: acks.acked(ghost))
    assert acks.acked(ghost) == []
    assert setup.stored(ghost) == []
