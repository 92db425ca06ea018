"""Scale-out: two ``fleet-server`` processes on one PostgreSQL and one broker.

The replicas split the MQTT ingest through the shared subscription
``$share/edgefleet-{namespace}/...`` (Mosquitto hands each message to one member of the
group, round-robin) and both serve the REST API. Events are keyed by
``message_id``, so a message delivered twice is stored once.

A replica's crash costs nothing: a replica acknowledges a QoS 1 message only
once its batch has committed, and its MQTT session is persistent, so what a
SIGKILLed replica held (in its ingest queue or in flight) and what the broker
queued for it while it was dead reach it when it is restarted with the same
replica id, and every message is stored once.

The broker is a private Mosquitto (see :mod:`testbed.server_process`)
that lets a replica's session queue a burst; PostgreSQL is the shared one,
with a fresh database per test.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from protocol.messages import DeviceEvent, Heartbeat, ReportedState
from protocol.topics import device_topic
from testbed.server_process import (
    FAN_IN_LIMITS,
    INGESTED,
    Broker,
    DeviceClient,
    ServerProcess,
    private_broker,
    wait_until,
)
from testbed.waiting import observe_for
from tests.support.databases import postgres_database

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

    def stored(self, after: int = 0) -> list[tuple[str, str]]:
        """``(message_id, ingested_by)`` of every stored event of this cluster's devices.

        ``after``: only events numbered above it (the run's ``after``-th event on).
        """
        rows = asyncio.run(_stored_events(self.db_url, self.device_ids))
        if after <= 0:
            return rows
        return [(m, r) for m, r in rows if int(m.rpartition("-")[2]) > after]

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
    # Anything still to come (nothing should be) has the window to arrive.
    observe_for(1.0, lambda: {m for m, _ in cluster.stored()} - set(sent), every=0.2)
    stored = cluster.stored()
    ids = Counter(message_id for message_id, _ in stored)
    assert set(ids) == set(sent), "events were lost or invented"
    # Never twice: message_id is the table's key, so a redelivery is stored once by design.
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


HEARTBEAT_DEVICES = 120


def test_a_replica_killed_mid_ingest_and_restarted_loses_nothing_and_stores_nothing_twice(
    cluster: Cluster,
) -> None:
    """SIGKILL replica B while it holds device messages, restart it: every message is stored.

    Events, reported states and heartbeats stream from the devices throughout.
    What B had received but not stored was never acknowledged, and what the
    broker queued for B's persistent session while it was dead is delivered
    when it returns. Events are counted exactly (one row per message id);
    each device's stored state must be the newest it sent (an older state
    delivered late must not replace it); each of the heartbeat-only devices
    sends exactly one heartbeat and nothing else, so it has been seen only if
    that one was stored.
    """
    a, b = cluster.a, cluster.b
    # B gathers each batch for two seconds, so whenever it is killed it holds messages it
    # received and has not stored (with acknowledgements on arrival they would be lost).
    b.stop()
    b.args += ["--ingest-batch-delay", "2"]
    b.start()
    heartbeat_ids = [f"{cluster.device_ids[0][:-3]}-hb{i:03d}" for i in range(HEARTBEAT_DEVICES)]
    for device_id in heartbeat_ids:
        a.api("POST", "/devices", cluster.token, {"device_id": device_id, "hardware_id": HARDWARE})
    beater = DeviceClient(cluster.broker.url, f"{cluster.run}-beater")
    events: list[str] = []
    newest_state: dict[str, str] = {}
    beats: list[str] = []
    started, back, stop = threading.Event(), threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            rounds = 0
            while not stop.is_set():
                rounds += 1
                now = time.time()
                for n, device_id in enumerate(cluster.device_ids):
                    message_id, payload = cluster.event(device_id)
                    events.append(message_id)
                    cluster.publish(device_id, payload)
                    if (rounds + n) % 4 == 0:
                        state = ReportedState(
                            device_id=device_id,
                            message_id=f"{cluster.run}-s{rounds:05d}-{n:02d}",
                            sent_at=now,
                            agent_version="1.0.0",
                            hardware_id=HARDWARE,
                            installed_counter=rounds,
                            phase="idle",
                        )
                        cluster.clients[device_id].publish(
                            device_topic(cluster.a.namespace, device_id, "state"),
                            state.model_dump_json().encode(),
                        )
                        newest_state[device_id] = state.message_id
                if len(beats) < len(heartbeat_ids):
                    device_id = heartbeat_ids[len(beats)]
                    beat = Heartbeat(
                        device_id=device_id,
                        message_id=f"{cluster.run}-hb-{len(beats):05d}",
                        sent_at=now,
                        uptime_s=float(rounds),
                    )
                    beater.publish(
                        device_topic(cluster.a.namespace, device_id, "heartbeat"),
                        beat.model_dump_json().encode(),
                    )
                    beats.append(device_id)
                if rounds == 25:
                    started.set()
                if back.is_set() and len(beats) == len(heartbeat_ids):
                    return
                time.sleep(0.03)
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
        sent_before_kill = set(events)
        stored_by_b_before_restart = {m for m, r in cluster.stored() if r == b.replica_id}
        time.sleep(1.5)  # the stream goes on while B is dead: the broker holds B's share
        b.start()
        wait_until(
            "the restarted replica B to store again",
            lambda: b.replica_id in {r for _, r in cluster.stored(after=len(events) - 200)},
        )
        back.set()
        publisher.join(60)
        assert not publisher.is_alive(), "the stream did not finish"
    finally:
        stop.set()
        publisher.join(10)
    assert not failure, failure
    cluster.flush()
    beater.flush()
    beater.close()
    assert len(beats) == HEARTBEAT_DEVICES and len(events) >= 1000

    sent = set(events)
    wait_until(
        f"all {len(sent)} events to be stored",
        lambda: {m for m, _ in cluster.stored()} >= sent,
        timeout=90,
    )

    def states_and_beats() -> dict[str, tuple[str | None, bool]] | None:
        rows = asyncio.run(_device_rows(cluster.db_url, [*cluster.device_ids, *heartbeat_ids]))
        done = all(rows[d][0] == m for d, m in newest_state.items()) and all(
            rows[d][1] for d in heartbeat_ids
        )
        return rows if done else None

    rows = wait_until("every newest state and every heartbeat to be stored", states_and_beats)
    # Anything still to come (nothing should be) has the window to arrive.
    observe_for(1.0, lambda: {m for m, _ in cluster.stored()} - sent, every=0.2)
    stored = cluster.stored()
    ids = Counter(message_id for message_id, _ in stored)
    assert set(ids) == sent, "events were lost or invented"
    # Never twice: message_id is the table's key, so a redelivery is stored once by design.
    # B took its share before the kill and again after the restart.
    assert {r for _, r in stored} == {a.replica_id, b.replica_id}
    # Some of what was sent before the kill B stored only after its restart: what it held
    # unstored and unacknowledged when it died, redelivered to its resumed session.
    redelivered = {
        m
        for m, r in stored
        if r == b.replica_id and m in sent_before_kill and m not in stored_by_b_before_restart
    }
    assert redelivered, "B stored nothing after its restart that was sent before its kill"
    rows = asyncio.run(_device_rows(cluster.db_url, [*cluster.device_ids, *heartbeat_ids]))
    assert {d: rows[d][0] for d in newest_state} == newest_state, "a newer state was replaced"
    assert all(rows[d][1] for d in heartbeat_ids), "a heartbeat was lost"


def test_a_replica_stopped_cleanly_leaves_nothing_behind_at_the_broker(cluster: Cluster) -> None:
    """Scale-down: B is stopped (SIGTERM) mid-stream and never returns; nothing waits for it.

    B's session is persistent, so without leaving the share group first the
    broker would keep queuing B's share for it. B unsubscribes, stores and
    acknowledges what it holds, and the stream goes on to A alone.
    """
    a, b = cluster.a, cluster.b
    events: list[str] = []
    started, stop = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            while not stop.is_set():
                for device_id in cluster.device_ids:
                    message_id, payload = cluster.event(device_id)
                    events.append(message_id)
                    cluster.publish(device_id, payload)
                if len(events) >= 500:
                    started.set()
                time.sleep(0.03)
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
        b.stop()
        assert b.returncode == 0, b.log_tail()
        stopped_at = len(events)
        time.sleep(2.0)  # the stream goes on without B
    finally:
        stop.set()
        publisher.join(10)
    assert not failure, failure
    cluster.flush()
    assert len(events) - stopped_at >= 300, "too short a stream after the stop to show anything"

    sent = set(events)
    wait_until(
        f"all {len(sent)} events to be stored",
        lambda: {m for m, _ in cluster.stored()} >= sent,
        timeout=60,
    )
    stored = cluster.stored()
    ids = Counter(message_id for message_id, _ in stored)
    assert set(ids) == sent and max(ids.values()) == 1
    assert {r for m, r in stored if int(m.rpartition("-")[2]) > stopped_at} == {a.replica_id}
    assert "not yet stored" not in b.log()


async def _device_rows(db_url: str, device_ids: list[str]) -> dict[str, tuple[str | None, bool]]:
    """Per device: the message id of its stored reported state, and whether it was seen."""
    connection = await asyncpg.connect(db_url)
    try:
        rows = await connection.fetch(
            "SELECT id, reported, last_seen_at FROM devices WHERE id = ANY($1::text[])",
            device_ids,
        )
    finally:
        await connection.close()
    out: dict[str, tuple[str | None, bool]] = {}
    for row in rows:
        reported = row["reported"]
        if isinstance(reported, str):
            reported = json.loads(reported)
        seen = row["last_seen_at"] is not None
        out[row["id"]] = (reported.get("message_id") if reported else None, seen)
    return out


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
