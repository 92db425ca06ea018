"""The server's MQTT connection: consume device messages, publish retained desired states.

One aiomqtt client per replica. With shared subscriptions (``$share/edgefleet-NS/...``)
the broker gives each device message to one replica, so replicas split the
ingest. A message is acknowledged to the broker when it arrives, before it is
written, and sessions are clean: messages a replica had received but not yet
written are lost if it dies (events are few and carry ids; the next state and
heartbeat supersede the lost ones). Windows are not lost that way: a device
keeps each window until an ack on its ``acks`` topic names it, and the server
sends that ack only after the window's transaction has committed, so a window
lost here is sent again (and a window stored twice is stored once). The
connection is retried with jittered backoff; desired states published while
disconnected are sent on reconnect, and every assigned device's desired state
is published again on connect (retained messages do not survive a broker
restart without persistence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import aiomqtt
from sqlalchemy import select

from fleet_server.config import ServerConfig
from fleet_server.db import Database
from fleet_server.db.models import Device, Release
from fleet_server.metrics import Metrics
from fleet_server.mqtt.ingest import Accepted, BatchResult, Dropped, classify, write_batch
from protocol.broker_url import parse_broker_url
from protocol.messages import BundleRef, DesiredState, WindowAck
from protocol.topics import acks_topic, desired_topic, ingest_subscriptions

log = logging.getLogger(__name__)

# The most window ids one ack carries (WindowAck's limit).
MAX_IDS_PER_ACK = 1000
ACK_TIMEOUT_S = 10.0
# What the drops write_batch reports mean, for the log.
_BATCH_DROPS = {
    "unknown-device": "from unregistered devices",
    "window-id-taken": "carrying a window id another device's window holds",
}


class ServerMqtt:
    """Ingest and publishing over one broker connection."""

    def __init__(self, config: ServerConfig, db: Database, metrics: Metrics) -> None:
        self.config = config
        self.db = db
        self.metrics = metrics
        self.queue: asyncio.Queue[Accepted] = asyncio.Queue(maxsize=50_000)
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, DesiredState] = {}
        self._drops: dict[str, int] = {}
        self.connected = asyncio.Event()

    def _client_args(self) -> dict[str, object]:
        address = parse_broker_url(self.config.mqtt_url or "mqtt://127.0.0.1:1883")
        tls = None
        if address.tls:
            from fleet_server.tls import client_context

            tls = client_context(self.config.mqtt_ca_file)
        return {
            "hostname": address.host,
            "port": address.port,
            "username": self.config.mqtt_username,
            "password": self.config.mqtt_password,
            # Unique per live replica: fleet_server.mqtt.claim refuses a second one with this id.
            "identifier": f"edgefleet-{self.config.namespace}-{self.config.replica_id}",
            "tls_context": tls,
            "keepalive": 30,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop``; ingest in batches meanwhile."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._writer(stop))
            tasks.create_task(self._connection(stop))

    async def _connection(self, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                async with aiomqtt.Client(**self._client_args()) as client:  # type: ignore[arg-type]
                    self._client = client
                    for topic in ingest_subscriptions(
                        self.config.namespace, self.config.shared_subscription
                    ):
                        await client.subscribe(topic, qos=1)
                    self.connected.set()
                    delay = 0.5
                    log.info("MQTT connected; ingesting")
                    await self._republish(client)
                    reader = asyncio.create_task(self._read(client))
                    stopper = asyncio.create_task(stop.wait())
                    await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    for t in (reader, stopper):
                        t.cancel()
                    await asyncio.gather(reader, stopper, return_exceptions=True)
                    if reader.done() and not reader.cancelled() and reader.exception():
                        raise reader.exception()  # type: ignore[misc]
            except aiomqtt.MqttError as exc:
                log.warning("MQTT connection lost (%s); retrying in %.1f s", exc, delay)
            finally:
                self._client = None
                self.connected.clear()
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 30.0)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = (
                message.payload
                if isinstance(message.payload, bytes | bytearray)
                else (str(message.payload).encode() if message.payload is not None else b"")
            )
            try:
                verdict = classify(
                    str(message.topic),
                    bytes(payload),
                    self.config.max_message_bytes,
                    namespace=self.config.namespace,
                )
            except Exception as exc:  # no message may stop the ingest
                verdict = Dropped("unreadable", f"{type(exc).__name__}: {exc}")
            if isinstance(verdict, Dropped):
                self._drop(verdict.reason, verdict.detail)
                continue
            await self.queue.put(verdict)

    def _drop(self, reason: str, detail: str, count: int = 1) -> None:
        self.metrics.messages_dropped.labels(reason).inc(count)
        seen = self._drops.get(reason, 0)
        self._drops[reason] = seen + count
        # The first few of each reason are logged in full, then one in a thousand.
        if seen < 10 or (seen + count) // 1000 > seen // 1000:
            log.info("dropped a device message (%s, %d so far): %s", reason, seen + count, detail)

    async def _writer(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and self.queue.empty()):
            try:
                first = await asyncio.wait_for(self.queue.get(), 0.5)
            except TimeoutError:
                continue
            batch = [first]
            deadline = time.monotonic() + self.config.ingest_batch_delay_s
            while len(batch) < self.config.ingest_batch_size:
                while len(batch) < self.config.ingest_batch_size and not self.queue.empty():
                    batch.append(self.queue.get_nowait())  # what is queued, no task per message
                remaining = deadline - time.monotonic()
                if len(batch) >= self.config.ingest_batch_size or remaining <= 0:
                    break
                await asyncio.sleep(min(remaining, 0.005))
            await self._store(batch)

    async def _store(self, batch: list[Accepted]) -> None:
        """Write a batch; if it fails, write its messages one by one and drop the poison."""
        try:
            result = await write_batch(self.db, batch, self.config.replica_id)
        except Exception as exc:
            log.warning(
                "writing %d device messages failed (%s); writing them one by one", len(batch), exc
            )
        else:
            self._count(result)
            await self._acknowledge(result.acks)
            return
        for item in batch:
            for attempt in range(3):
                try:
                    result = await write_batch(self.db, [item], self.config.replica_id)
                except Exception as exc:
                    if attempt == 2:  # a message the database will not take: drop it, counted
                        self._drop("unstorable", f"{item.device_id}/{item.channel}: {exc}")
                    else:
                        await asyncio.sleep(0.5 * (attempt + 1))
                else:
                    self._count(result)
                    await self._acknowledge(result.acks)
                    break

    def _count(self, result: BatchResult) -> None:
        for channel, n in result.ingested.items():
            self.metrics.messages_ingested.labels(channel).inc(n)
        for reason, n in result.dropped.items():
            self._drop(reason, f"{n} message(s) {_BATCH_DROPS.get(reason, reason)}", n)

    async def _acknowledge(self, acks: dict[str, list[str]]) -> None:
        """Tell each device which of its windows are stored (QoS 1, not retained).

        An ack that cannot be sent is not retried: the device sends those
        windows again, and they are acknowledged then.
        """
        client = self._client
        if not acks:
            return
        if client is None:
            log.info("not connected: %d device(s) get no window ack this time", len(acks))
            return
        messages = [
            WindowAck(device_id=device_id, window_ids=ids[i : i + MAX_IDS_PER_ACK])
            for device_id, ids in sorted(acks.items())
            for i in range(0, len(ids), MAX_IDS_PER_ACK)
        ]
        outcomes = await asyncio.gather(
            *(
                client.publish(
                    acks_topic(self.config.namespace, ack.device_id),
                    ack.model_dump_json().encode(),
                    qos=1,
                    retain=False,
                    timeout=ACK_TIMEOUT_S,
                )
                for ack in messages
            ),
            return_exceptions=True,
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            log.warning(
                "%d of %d window acks were not sent (%s); those windows will be sent again",
                len(failed),
                len(messages),
                failed[0],
            )

    async def publish_desired(self, desired: DesiredState) -> None:
        """Publish a device's desired state, retained (later if disconnected)."""
        client = self._client
        if client is None:
            self._pending[desired.device_id] = desired
            return
        try:
            await client.publish(
                desired_topic(self.config.namespace, desired.device_id),
                desired.model_dump_json().encode(),
                qos=1,
                retain=True,
            )
        except aiomqtt.MqttError:
            self._pending[desired.device_id] = desired

    async def _republish(self, client: aiomqtt.Client) -> None:
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(Device, Release).join(
                        Release, Release.target_path == Device.assigned_target
                    )
                )
            ).all()
        states = {
            d.id: DesiredState(
                device_id=d.id,
                director_version=d.director_version,
                bundle=BundleRef(
                    name=r.name,
                    version=r.version,
                    release_counter=r.release_counter,
                    sha256=r.sha256,
                ),
                issued_at=time.time(),
            )
            for d, r in rows
        }
        states.update(self._pending)
        self._pending.clear()
        for desired in states.values():
            await client.publish(
                desired_topic(self.config.namespace, desired.device_id),
                desired.model_dump_json().encode(),
                qos=1,
                retain=True,
            )
