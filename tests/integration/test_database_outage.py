"""The database goes away mid-ingest: device messages wait at the broker, none is dropped.

A message is acknowledged to the broker only once it is stored. While the
database does not answer at all, nothing can be stored, and nothing is poison
either: the server holds what it received, unacknowledged (the broker holds
the rest), and stores it when the database returns. Only a message the
database answers for and still refuses is dropped as ``unstorable``.

A real Mosquitto (the shared one, in a namespace of the test's own), a real
SQLite database, and the server's real ingest; the outage is injected into
the database driver, so every statement fails while it lasts.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from fleet_server.config import ServerConfig
from fleet_server.db import Database, migrate
from fleet_server.db.models import Device, DeviceEventRow
from fleet_server.metrics import Metrics
from fleet_server.mqtt import link
from fleet_server.mqtt.link import ServerMqtt
from protocol.messages import DeviceEvent, Heartbeat
from protocol.topics import device_topic
from testbed.server_process import DeviceClient

pytestmark = pytest.mark.integration

SHARED_BROKER = "mqtt://127.0.0.1:1883"
EVENTS = 40


class Outage:
    """Every statement on ``db`` fails while :attr:`on` is set."""

    def __init__(self, db: Database) -> None:
        self.on = False
        self.refused = 0
        event.listen(db.engine.sync_engine, "before_cursor_execute", self._check)

    def _check(self, *_: Any) -> None:
        if self.on:
            self.refused += 1
            raise OperationalError("SELECT", {}, ConnectionError("injected: database away"))


async def stored(db: Database, device_id: str) -> int:
    async with db.session() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(DeviceEventRow)
            .where(DeviceEventRow.device_id == device_id)
        )
    return int(count or 0)


def _config(tmp_path: Path, run: str) -> ServerConfig:
    return ServerConfig(
        data_dir=tmp_path,
        db_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        mqtt_url=SHARED_BROKER,
        mqtt_namespace=f"outage-{run}",
        replica_id=f"outage-{run}",
    )


def _event(device_id: str, run: str, i: int) -> bytes:
    return (
        DeviceEvent(
            device_id=device_id,
            message_id=f"{run}-{i:04d}-{uuid.uuid4().hex[:6]}",
            sent_at=time.time(),
            event="outage-test",
            at=time.time(),
        )
        .model_dump_json()
        .encode()
    )


def test_messages_sent_while_the_database_is_away_are_stored_when_it_returns(
    tmp_path: Path,
) -> None:
    run = secrets.token_hex(4)
    device_id = f"outage-{run}"
    config = _config(tmp_path, run)
    migrate(config.db_url)

    async def scenario() -> tuple[int, float, int]:
        db = Database(config.db_url)
        async with db.session() as session:
            session.add(Device(id=device_id, hardware_id="rpi4", enrolled_at=datetime.now(UTC)))
        outage = Outage(db)
        metrics = Metrics()
        mqtt = ServerMqtt(config, db, metrics)
        stop = asyncio.Event()
        serving = asyncio.create_task(mqtt.run(stop))
        device = DeviceClient(SHARED_BROKER, device_id)
        try:
            await asyncio.wait_for(mqtt.connected.wait(), 30)
            outage.on = True
            for i in range(EVENTS):
                device.publish(
                    device_topic(config.namespace, device_id, "events"), _event(device_id, run, i)
                )
            await asyncio.to_thread(device.flush)
            # Longer than every retry of the writer put together: then it gave up and dropped.
            await asyncio.sleep(5.0)
            refused_during = outage.refused
            outage.on = False
            deadline = time.monotonic() + 60
            while await stored(db, device_id) < EVENTS and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            count = await stored(db, device_id)
            dropped = metrics.messages_dropped.labels("unstorable")._value.get()
            return count, dropped, refused_during
        finally:
            device.close()
            stop.set()
            await asyncio.wait_for(serving, 30)
            await db.close()

    count, dropped, refused_during = asyncio.run(scenario())
    assert refused_during > 0, "the outage never met the writer"
    assert dropped == 0, f"{dropped} message(s) dropped as unstorable during the outage"
    assert count == EVENTS


HEARTBEATS = 60
QUEUED_MAX = 10  # instead of link.QOS0_QUEUED_MAX, so the test fills it quickly


def test_heartbeats_beyond_the_queue_bound_are_dropped_during_an_outage_events_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QoS 0 heartbeats are not held back by the broker: past the bound they are dropped
    as ``overloaded`` and counted, while QoS 1 events still wait and are all stored."""
    monkeypatch.setattr(link, "QOS0_QUEUED_MAX", QUEUED_MAX)
    run = secrets.token_hex(4)
    device_id = f"outage-{run}"
    config = _config(tmp_path, run)
    migrate(config.db_url)

    async def scenario() -> tuple[int, float, int]:
        db = Database(config.db_url)
        async with db.session() as session:
            session.add(Device(id=device_id, hardware_id="rpi4", enrolled_at=datetime.now(UTC)))
        outage = Outage(db)
        metrics = Metrics()
        mqtt = ServerMqtt(config, db, metrics)
        stop = asyncio.Event()
        serving = asyncio.create_task(mqtt.run(stop))
        device = DeviceClient(SHARED_BROKER, device_id)
        try:
            await asyncio.wait_for(mqtt.connected.wait(), 30)
            outage.on = True
            for i in range(EVENTS):
                device.publish(
                    device_topic(config.namespace, device_id, "events"), _event(device_id, run, i)
                )
            for i in range(HEARTBEATS):
                beat = Heartbeat(
                    device_id=device_id,
                    message_id=f"beat-{run}-{i}",
                    sent_at=time.time(),
                    uptime_s=1.0,
                )
                device.publish(
                    device_topic(config.namespace, device_id, "heartbeat"),
                    beat.model_dump_json().encode(),
                    qos=0,
                )
            await asyncio.to_thread(device.flush)
            overloaded = metrics.messages_dropped.labels("overloaded")
            deadline = time.monotonic() + 30
            while overloaded._value.get() < HEARTBEATS - QUEUED_MAX and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # any heartbeat still on its way is taken or dropped
            queued = mqtt.queue.qsize()
            outage.on = False
            deadline = time.monotonic() + 60
            while await stored(db, device_id) < EVENTS and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return await stored(db, device_id), overloaded._value.get(), queued
        finally:
            device.close()
            stop.set()
            await asyncio.wait_for(serving, 30)
            await db.close()

    count, overloaded, queued = asyncio.run(scenario())
    # Heartbeats were queued only while the queue held fewer than the bound (the writer
    # takes a batch of the events out of it), the rest dropped: never more than the bound.
    assert HEARTBEATS - QUEUED_MAX <= overloaded <= HEARTBEATS
    assert queued <= EVENTS + QUEUED_MAX
    assert count == EVENTS
