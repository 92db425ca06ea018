"""Scale-out: two ``fleet-server`` processes on one PostgreSQL and one broker.

The replicas split the MQTT ingest through the shared subscription
``$share/edgefleet-{namespace}/...`` (Mosquitto hands each message to one member of the
group, round-robin) and both serve the REST API. Events are keyed by
``message_id``, so a message delivered twice is stored once.

What a replica's crash costs, precisely: a replica acknowledges a QoS 1
message when it arrives, before its batch is written, and its MQTT session is
clean, so the messages the broker had already handed to a replica that is
SIGKILLed (in its ingest queue, in flight, or queued for it at the broker) are
lost. Every message published after the broker has noticed the death goes to
the surviving replicas, and all of them are stored.

The broker is a private Mosquitto (see :mod:`tests.support.server_process`)
that lets a replica's session queue a burst; PostgreSQL is the shared one,
with a fresh database per test.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from protocol.messages import DeviceEvent
from protocol.topics import device_topic
from tests.support.databases import postgres_database
from tests.support.server_process import (
    FAN_IN_LIMITS,
    INGESTED,
    Broker,
    DeviceClient,
    ServerProcess,
    private_broker,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 20
HARDWARE = "rpi4-arm64"


@dataclass
class Cluster:
    """Two replicas, their broker and database, and one publishing client per device."""

    broker: Broker
    db_url: str
    a: ServerProcess
    b: ServerProcess
    token: str
    device_ids: list[str]
    clients: dict[str, DeviceClient] = field(default_factory=dict)
    run: str = field(default_factory=lambda: secrets.token_hex(4))
    _next: int = 0

    def event(self, device_id: str) -> tuple[str, bytes]:
        """A new event of ``device_id``: its message id and payload."""
        self._next += 1
        message_id = f"{self.run}-{self._next:07d}"
        now = time.time()
        event = DeviceEvent(
            device_id=device_id,
            message_id=message_id,
            sent_at=now,
            event="scale-out",
            at=now,
            details={"seq": self._next},
        )
        return message_id, event.model_dump_json().encode()

    def publish(self, device_id: str, payload: bytes) -> None:
        self.clients[device_id].publish(
            device_topic(self.a.namespace, device_id, "events"), payload
        )

    def flush(self) -> None:
        for client in self.clients.values():
            client.flush()

    def stored(self) -> list[tuple[str, str]]:
        """``(message_id, ingested_by)`` of every stored event of this cluster's devices."""
        return asyncio.run(_stored_events(self.db_url, self.device_ids))

    def ingested_events(self, *replicas: ServerProcess) -> float:
        return sum(r.counter(INGESTED, "channel").get("events", 0.0) for r in replicas)


async def _stored_events(db_url: str, device_ids: list[str]) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(db_url)
    try:
        rows = await connection.fetch(
            "SELECT message_id, ingested_by FROM device_events WHERE device_id = ANY($1::text[])",
            device_ids,
        )
    finally:
        await connection.close()
    return [(row["message_id"], row["ingested_by"]) for row in rows]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    suffix = secrets.token_hex(3)
    with (
        private_broker(tmp_path / "broker", FAN_IN_LIMITS) as broker,
        postgres_database() as db_url,
    ):
        a = ServerProcess(tmp_path, db_url=db_url, broker=broker.url, replica_id=f"a-{suffix}")
        b = ServerProcess(tmp_path, db_url=db_url, broker=broker.url, replica_id=f"b-{suffix}")
        clients: dict[str, DeviceClient] = {}
        try:
            # One after the other: see test_two_replicas_started_at_once_both_come_up.
            a.start()
            b.start()
            token = a.admin_token()
            device_ids = [f"scale-{suffix}-{i:02d}" for i in range(DEVICES)]
            for device_id in device_ids:
                a.api("POST", "/devices", token, {"device_id": device_id, "hardware_id": HARDWARE})
            for device_id in device_ids:
                clients[device_id] = DeviceClient(broker.url, device_id)
            yield Cluster(broker, db_url, a, b, token, device_ids, clients)
        finally:
            for client in clients.values():
                client.close()
            a.stop()
            b.stop()


def test_two_replicas_split_the_ingest_and_store_every_event_once(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    # Both replicas serve the API, from the one database, with the one bootstrap token.
    assert not (b.data / "admin.token").exists(), "the admin token was bootstrapped twice"
    for replica in (a, b):
        listed = {d["id"] for d in replica.api("GET", "/devices", cluster.token)["devices"]}
        assert listed >= set(cluster.device_ids), replica.replica_id

    sent: dict[str, bytes] = {}
    resend_later: list[tuple[str, bytes]] = []
    published = 0
    for i in range(150):
        for n, device_id in enumerate(cluster.device_ids):
            message_id, payload = cluster.event(device_id)
            sent[message_id] = payload
            cluster.publish(device_id, payload)
            published += 1
            if (i + n) % 20 == 0:
                # Right behind the original: most likely the other replica, maybe the same batch.
                cluster.publish(device_id, payload)
                published += 1
            elif (i + n) % 20 == 10:
                resend_later.append((device_id, payload))
    for device_id, payload in resend_later:
        cluster.publish(device_id, payload)
        published += 1
    cluster.flush()
    assert published - len(sent) >= 250

    wait_until(
        f"all {len(sent)} distinct events to be stored",
        lambda: len(cluster.stored()) >= len(sent),
        timeout=60,
    )
    wait_until(
        f"both replicas to count all {published} deliveries",
        lambda: cluster.ingested_events(a, b) >= published,
        timeout=30,
    )
    time.sleep(1.0)  # anything still to come (nothing should be) has had time to arrive
    stored = cluster.stored()
    ids = Counter(message_id for message_id, _ in stored)
    assert set(ids) == set(sent), "events were lost or invented"
    assert max(ids.values()) == 1, "an event was stored twice"
    by_replica = Counter(replica for _, replica in stored)
    assert set(by_replica) == {a.replica_id, b.replica_id}
    # Round-robin: each replica took a real share, not a stray message or two.
    assert min(by_replica.values()) >= len(sent) // 5, by_replica
    # Both replicas still answer with the same devices.
    views = [{d["id"] for d in r.api("GET", "/devices", cluster.token)["devices"]} for r in (a, b)]
    assert views[0] == views[1] >= set(cluster.device_ids)
    # Each delivery was counted once, by the one replica that got it; duplicates count too
    # (they were processed), they were only not stored twice.
    counted = cluster.ingested_events(a, b)
    assert counted == published, f"{counted:.0f} counted for {published} deliveries: some twice"


def test_what_is_published_after_a_replica_is_killed_all_lands_on_the_survivor(
    cluster: Cluster,
) -> None:
    a, b = cluster.a, cluster.b
    published_at: dict[str, float] = {}
    started, stop = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            while not stop.is_set():
                for device_id in cluster.device_ids:
                    message_id, payload = cluster.event(device_id)
                    published_at[message_id] = time.monotonic()
                    cluster.publish(device_id, payload)
                if len(published_at) >= 500:
                    started.set()
                time.sleep(0.04)  # ~500 events a second: a rate the replicas keep up with
        except BaseException as exc:
            failure.append(exc)
            started.set()

    publisher = threading.Thread(target=stream, daemon=True)
    publisher.start()
    try:
        assert started.wait(30), "the stream did not start"
        wait_until(
            "replica B to store part of the stream",
            lambda: b.replica_id in {replica for _, replica in cluster.stored()},
        )
        b.kill()
        killed_at = time.monotonic()
        # The kernel closes B's socket as the process dies; the broker then drops its clean
        # session and with it B's membership of the share group.
        b_client = f"edgefleet-{b.namespace}-{b.replica_id}"  # the ingest client
        wait_until(
            "the broker to notice that replica B is gone",
            lambda: any(
                b_client in line and ("disconnect" in line or "closed" in line)
                for line in cluster.broker.log().splitlines()
            ),
            timeout=10,
        )
        noticed_at = time.monotonic()
        time.sleep(2.0)  # the stream goes on without B
    finally:
        stop.set()
        publisher.join(10)
    assert not failure, failure
    cluster.flush()
    assert a.alive and not b.alive

    after = {m for m, t in published_at.items() if t > noticed_at}
    assert len(after) >= 300, "too short a stream after the kill to show anything"

    def all_after_stored() -> dict[str, str] | None:
        rows = dict(cluster.stored())
        return rows if rows.keys() >= after else None

    by_id = wait_until(
        f"the {len(after)} events published after B's death to be stored",
        all_after_stored,
        timeout=60,
    )
    # Nothing published after the death went missing, and A took all of it.
    assert {by_id[m] for m in after} == {a.replica_id}
    # B really was taking a share of the stream before it died.
    assert b.replica_id in by_id.values()

    # Only what the broker had already handed to B can be missing; report how much it was.
    lost = set(published_at) - by_id.keys()
    assert all(published_at[m] <= noticed_at for m in lost)
    window = noticed_at - killed_at
    print(
        f"\n{len(published_at)} events streamed; {len(lost)} lost with replica B "
        f"(handed to it before the broker noticed its death, {window * 1000:.0f} ms after "
        f"the SIGKILL); all {len(after)} published afterwards stored by {a.replica_id}"
    )


def test_two_replicas_started_at_once_on_an_empty_database_both_come_up(tmp_path: Path) -> None:
    """Replicas are started together (an orchestrator does); each migrates the schema first."""
    with private_broker(tmp_path / "broker") as broker, postgres_database() as db_url:
        replicas = [
            ServerProcess(tmp_path, db_url=db_url, broker=broker.url, replica_id=f"r{i}")
            for i in range(2)
        ]
        try:
            for r in replicas:
                r.launch()
            for r in replicas:
                r.wait_ready()
            tokens = [r.data / "admin.token" for r in replicas if (r.data / "admin.token").exists()]
            assert len(tokens) == 1, "exactly one replica bootstraps the admin token"
        finally:
            for r in replicas:
                r.stop()
