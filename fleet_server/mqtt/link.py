"""The server's MQTT connection: consume device messages, publish retained desired states.

One aiomqtt client per replica. With shared subscriptions (``$share/edgefleet-NS/...``)
the broker gives each device message to one replica, so replicas split the
ingest.

Nothing a device sent is lost with a replica that dies. A QoS 1 message is
acknowledged to the broker only once the transaction that stored it has
committed (messages the gate drops are acknowledged at once: there is nothing
to store), and the session is persistent (MQTT 5, clean start off, a session
expiry of ``mqtt_session_expiry_s``), so what a SIGKILLed replica held
unacknowledged, and what the broker queued for it while it was down, is
delivered again when it reconnects with the same replica id. That needs a
replica id that survives restarts (``--replica-id``, e.g. the StatefulSet pod
or systemd instance name); a replica without one keeps no session. Mosquitto drops
what it queued for a shared-subscription member whose clean session died
(eclipse/mosquitto#2662); a persistent session is what keeps it. The broker
sends at most ``mqtt_receive_maximum`` unacknowledged messages (MQTT 5 Receive
Maximum) and holds the rest, which bounds what a replica has in memory. A
broker that does not speak MQTT 5 (the embedded amqtt) gets MQTT 3.1.1 with
``clean_session`` off; its own in-flight limit then bounds the window.

A delivery is stored at least once, so storing is idempotent: events are
keyed by ``message_id``, windows by ``window_id``, and a reported state older
than the stored one does not replace it. On a clean stop the replica
unsubscribes first, so the broker queues nothing more for it, then stores and
acknowledges what it holds before it disconnects.

Windows have a second guarantee: a device keeps each window until an ack on
its ``acks`` topic names it, and the server sends that ack only after the
window's transaction has committed. The connection is retried with jittered
backoff; desired states published while disconnected are sent on reconnect,
and every assigned device's desired state is published again on connect
(retained messages do not survive a broker restart without persistence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_ERR_AGAIN, MQTT_ERR_SUCCESS, MQTTMessage, error_string
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_server.config import ServerConfig
from fleet_server.db import Database
from fleet_server.metrics import Metrics
from fleet_server.mqtt import store
from fleet_server.mqtt.ingest import Accepted, BatchResult, Dropped, classify, write_batch
from fleet_server.mqtt.property_tables import share_property_tables
from protocol.broker_url import parse_broker_url
from protocol.messages import BundleRef, DesiredState, WindowAck
from protocol.topics import acks_topic, desired_topic, ingest_subscriptions

log = logging.getLogger(__name__)

# The most window ids one ack carries (WindowAck's limit).
MAX_IDS_PER_ACK = 1000
# How long a broker may take to answer an MQTT 5 CONNECT before 3.1.1 is tried
# (amqtt never answers one).
V5_CONNECT_TIMEOUT_S = 5.0
# On a clean stop: how long to keep reading what the broker still sends after the
# unsubscribe, and how long to wait for it to be stored and acknowledged.
LEAVE_QUIET_S = 0.5
LEAVE_TIMEOUT_S = 10.0
# The most packets read off the connection in one turn of the event loop.
READ_BURST = 64
# The broker holds back unacknowledged QoS 1 messages beyond the Receive Maximum, but not
# QoS 0 ones (heartbeats): those are dropped ("overloaded") while the writer's queue holds
# this many, as when the database is away, rather than held in memory without end.
QOS0_QUEUED_MAX = 10_000
# What the drops write_batch reports mean, for the log.
_BATCH_DROPS = {
    "unknown-device": "from unregistered devices",
    "decommissioned-device": "from decommissioned devices",
    "window-id-taken": "carrying a window id another device's window holds",
}


@dataclass(frozen=True)
class Delivery:
    """Which connection delivered a message, and its packet id: what acknowledging needs."""

    client: aiomqtt.Client
    mid: int
    qos: int


class ServerMqtt:
    """Ingest and publishing over one broker connection."""

    def __init__(self, config: ServerConfig, db: Database, metrics: Metrics) -> None:
        # paho would build its MQTT 5 property tables for every packet read: twice a window.
        share_property_tables()
        self.config = config
        self.db = db
        self.metrics = metrics
        self.queue: asyncio.Queue[tuple[Accepted, Delivery]] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        # Received and not yet acknowledged (queued or being written).
        self._unsettled = 0
        self._last_arrival = 0.0
        # Set once a broker refused MQTT 5 and took 3.1.1.
        self._mqtt311 = False
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
        left = asyncio.Event()  # the connection is closed: nothing more will arrive

        async def connection() -> None:
            try:
                await self._connection(stop)
            finally:
                left.set()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._writer(left))
            tasks.create_task(connection())

    def _ingest_topics(self) -> list[str]:
        return list(ingest_subscriptions(self.config.namespace, self.config.shared_subscription))

    @property
    def session_expiry_s(self) -> int:
        """How long the broker keeps this replica's session after it goes; 0: not at all.

        Only a replica id given in the configuration is stable across restarts.
        A session under a derived one (host and process id) is never resumed,
        and Mosquitto would go on handing it a share of the group's messages
        until it expired, so such a replica's session ends with its connection.
        """
        if "replica_id" not in self.config.model_fields_set:
            return 0
        return self.config.mqtt_session_expiry_s

    def _new_client(self) -> aiomqtt.Client:
        """A client with the session of :attr:`session_expiry_s`, acknowledging by hand."""
        args = self._client_args()
        if self._mqtt311:
            client = aiomqtt.Client(
                **args,  # type: ignore[arg-type]
                clean_session=self.session_expiry_s == 0,
            )
        else:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry_s
            properties.ReceiveMaximum = self.config.mqtt_receive_maximum
            client = aiomqtt.Client(
                **args,  # type: ignore[arg-type]
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
                properties=properties,
                timeout=V5_CONNECT_TIMEOUT_S,
            )
        # aiomqtt 2.5 has no option for it; paho's own switch keeps PUBACKs for ack().
        client._client.manual_ack_set(True)
        # Messages go from paho straight to the gate; aiomqtt keeps the connection.
        client._client.on_message = lambda _paho, _userdata, message: self._take(client, message)
        opened = client._client.on_socket_open

        def on_socket_open(paho: Any, userdata: Any, sock: Any) -> None:
            opened(paho, userdata, sock)  # type: ignore[misc]
            # Called on aiomqtt's connecting thread, after it asked the loop to add its
            # reader: this one replaces it there, in order.
            client._loop.call_soon_threadsafe(
                client._loop.add_reader, sock.fileno(), self._read_socket, client
            )

        client._client.on_socket_open = on_socket_open
        return client

    def _read_socket(self, client: aiomqtt.Client) -> None:
        """Read what the socket holds, up to :data:`READ_BURST` packets at a time.

        aiomqtt's reader reads one packet per readiness of the socket (paho's
        ``loop_read`` reads one unless messages of its own are in flight): an
        event-loop turn and a ``poll`` for each window received. This is that
        ``loop_read`` with a larger count; what it does on an error is paho's
        own (``_loop_rc_handle``), and an exception ends the connection as
        aiomqtt's reader ends it.
        """
        paho = client._client
        try:
            for _ in range(READ_BURST):
                if paho._sock is None:
                    return
                rc = paho._packet_read()
                if rc == MQTT_ERR_AGAIN:
                    return
                if rc > 0:
                    paho._loop_rc_handle(rc)
                    return
            # TLS may hold decrypted bytes the socket no longer signals: read on next turn.
            pending = getattr(paho._sock, "pending", None)
            if pending is not None and pending() > 0:
                client._loop.call_soon(self._read_socket, client)
        except Exception as exc:
            if not client._disconnected.done():
                client._disconnected.set_exception(exc)

    async def _connection(self, stop: asyncio.Event) -> None:
        if self.session_expiry_s == 0:
            log.warning(
                "MQTT session not persistent (no --replica-id, or a session expiry of 0): "
                "device messages this replica holds when it dies are lost; give each replica "
                "an id that stays the same across its restarts"
            )
        delay = 0.5
        while not stop.is_set():
            client = self._new_client()
            entered = False
            try:
                async with client:
                    entered = True
                    client.timeout = 10.0
                    self._client = client
                    for topic in self._ingest_topics():
                        await client.subscribe(topic, qos=1)
                    self.connected.set()
                    delay = 0.5
                    if self._mqtt311:
                        log.warning(
                            "the broker speaks MQTT 3.1.1 only: its own in-flight limit bounds "
                            "what is unacknowledged, and a persistent session never expires there"
                        )
                    log.info("MQTT connected; ingesting")
                    await self._republish(client)
                    reader = asyncio.create_task(self._read(client))
                    stopper = asyncio.create_task(stop.wait())
                    try:
                        await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                        if stopper.done() and not reader.done():
                            await self._leave(client, reader)
                    finally:
                        # Also when this task is cancelled: no reader outlives its connection.
                        for t in (reader, stopper):
                            t.cancel()
                        await asyncio.gather(reader, stopper, return_exceptions=True)
                    if reader.done() and not reader.cancelled() and reader.exception():
                        raise reader.exception()  # type: ignore[misc]
            except aiomqtt.MqttError as exc:
                if not entered and not self._mqtt311:
                    # No answer or a refusal to MQTT 5: try 3.1.1 at once; if that
                    # connects, this broker gets 3.1.1 from now on.
                    log.info("the broker did not take MQTT 5 (%s); trying MQTT 3.1.1", exc)
                    self._mqtt311 = True
                    continue
                log.warning("MQTT connection lost (%s); retrying in %.1f s", exc, delay)
                if not entered and self._mqtt311:
                    self._mqtt311 = False  # neither version connected: start again with 5
            finally:
                self._client = None
                self.connected.clear()
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 30.0)

    async def _leave(self, client: aiomqtt.Client, reader: asyncio.Task[None]) -> None:
        """Stop cleanly: unsubscribe, take in what is still coming, store and acknowledge it.

        The session stays (a restarted replica resumes it); unsubscribing first
        means the broker queues nothing more for a replica that may not return.
        """
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        try:
            for topic in self._ingest_topics():
                await client.unsubscribe(topic, timeout=LEAVE_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            log.warning("could not unsubscribe before stopping (%s)", exc)
        while not reader.done() and time.monotonic() < deadline:
            if time.monotonic() - self._last_arrival >= LEAVE_QUIET_S and self._unsettled == 0:
                return
            await asyncio.sleep(0.05)
        if self._unsettled:
            log.warning(
                "stopping with %d device message(s) not yet stored; %s",
                self._unsettled,
                "the broker delivers them again when this replica returns"
                if self.session_expiry_s
                else "they are lost (no persistent session)",
            )

    async def _read(self, client: aiomqtt.Client) -> None:
        """Wait for the connection to end; its messages are taken by :meth:`_take`.

        Ends the way aiomqtt's message iterator ends, with an :class:`aiomqtt.MqttError`.
        """
        disconnected = client._disconnected
        # Waited on, not awaited: cancelling this task must not cancel aiomqtt's future.
        await asyncio.wait([disconnected])
        cause = None if disconnected.cancelled() else disconnected.exception()
        raise aiomqtt.MqttError("Disconnected during message iteration") from cause

    def _take(self, client: aiomqtt.Client, message: MQTTMessage) -> None:
        """Gate one received message: queue it for the writer, or drop and acknowledge it.

        paho's ``on_message``, called on the event loop (aiomqtt reads the socket
        there) for each PUBLISH as it is read: no aiomqtt ``Message``, no queue
        between paho and the gate, no task per message. The broker holds back
        what is beyond the Receive Maximum (MQTT 5) or its own in-flight limit
        (3.1.1) until acks free room; a QoS 0 message, which it does not hold
        back, is dropped while the queue holds :data:`QOS0_QUEUED_MAX`.
        """
        self._last_arrival = time.monotonic()
        if message.qos == 0 and self.queue.qsize() >= QOS0_QUEUED_MAX:
            self._drop("overloaded", f"QoS 0 on {message.topic}: {QOS0_QUEUED_MAX} queued")
            return
        delivery = Delivery(client, message.mid, message.qos)
        try:
            verdict = classify(
                message.topic,
                bytes(message.payload),
                self.config.max_message_bytes,
                namespace=self.config.namespace,
            )
        except Exception as exc:  # no message may stop the ingest
            verdict = Dropped("unreadable", f"{type(exc).__name__}: {exc}")
        if isinstance(verdict, Dropped):
            self._drop(verdict.reason, verdict.detail)
            self._ack([delivery])  # nothing to store
            return
        self._unsettled += 1
        self.queue.put_nowait((verdict, delivery))

    def _ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge stored (or dropped) messages to the broker.

        Only on the connection that delivered them: after a reconnect the
        broker sends again what was not acknowledged, and a packet id of the old
        connection may name another message on the new one.
        """
        current = self._client
        for d in deliveries:
            if d.qos > 0 and d.client is current:
                d.client._client.ack(d.mid, d.qos)

    def _drop(self, reason: str, detail: str, count: int = 1) -> None:
        self.metrics.messages_dropped.labels(reason).inc(count)
        seen = self._drops.get(reason, 0)
        self._drops[reason] = seen + count
        # The first few of each reason are logged in full, then one in a thousand.
        if seen < 10 or (seen + count) // 1000 > seen // 1000:
            log.info("dropped a device message (%s, %d so far): %s", reason, seen + count, detail)

    async def _writer(self, left: asyncio.Event) -> None:
        while not (left.is_set() and self.queue.empty()):
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

    async def _store(self, batch: list[tuple[Accepted, Delivery]]) -> None:
        """Write a batch; if it fails, write its messages one by one and drop the poison.

        Each message is acknowledged to the broker once its transaction has
        committed, or once it is dropped for good. A message is poison only if
        the database answers and still refuses it: while the database itself is
        away, the batch is held unacknowledged until it returns.
        """
        while True:
            try:
                result = await write_batch(self.db, [a for a, _ in batch], self.config.replica_id)
            except Exception as exc:
                if await self._database_answers():
                    log.warning(
                        "writing %d device messages failed (%s); writing them one by one",
                        len(batch),
                        exc,
                    )
                    break
                if not await self._await_database(batch):
                    return
            else:
                self._settle([d for _, d in batch])
                self._count(result)
                self._acknowledge(result.acks)
                return
        for item, delivery in batch:
            await self._store_one(item, delivery)

    async def _store_one(self, item: Accepted, delivery: Delivery) -> None:
        attempt = 0
        while True:
            try:
                result = await write_batch(self.db, [item], self.config.replica_id)
            except Exception as exc:
                attempt += 1
                if attempt < 3:
                    await asyncio.sleep(0.5 * attempt)
                elif await self._database_answers():
                    # A message the database will not take: drop it, counted.
                    self._drop("unstorable", f"{item.device_id}/{item.channel}: {exc}")
                    self._settle([delivery])
                    return
                elif not await self._await_database([(item, delivery)]):
                    return
                else:
                    attempt = 0
            else:
                self._settle([delivery])
                self._count(result)
                self._acknowledge(result.acks)
                return

    async def _database_answers(self) -> bool:
        return await store.database_answers(self.db)

    async def _await_database(self, batch: list[tuple[Accepted, Delivery]]) -> bool:
        """Hold ``batch`` unacknowledged until the database answers; whether any is left.

        Messages whose connection is gone are let go unacknowledged: the broker
        delivers them again on the next connection (a persistent session), and
        their packet ids mean nothing there.
        """
        log.warning(
            "the database does not answer; holding %d device message(s) unacknowledged "
            "until it does",
            len(batch),
        )
        delay = 0.5
        while True:
            current = [(a, d) for a, d in batch if d.client is self._client]
            self._unsettled -= len(batch) - len(current)
            batch[:] = current
            if not batch:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if await self._database_answers():
                log.info("the database answers again; storing what was held")
                return True

    def _settle(self, deliveries: list[Delivery]) -> None:
        self._ack(deliveries)
        self._unsettled -= len(deliveries)

    def _count(self, result: BatchResult) -> None:
        for channel, n in result.ingested.items():
            self.metrics.messages_ingested.labels(channel).inc(n)
        for reason, n in result.dropped.items():
            self._drop(reason, f"{n} message(s) {_BATCH_DROPS.get(reason, reason)}", n)

    def _acknowledge(self, acks: dict[str, list[str]]) -> None:
        """Tell each device which of its windows are stored (QoS 1, not retained).

        Called once the windows' transaction has committed. A batch's acks are
        handed to the connection together and not awaited one by one: the
        connection sends them and takes their PUBACKs while the next batch is
        written (at most its in-flight limit at a time, the rest queued in
        order). They belong to the connection they were handed to: a connection
        that ends drops what it has not sent, and the next one never sends
        them, so no ack goes out twice. An ack that is not sent is not retried:
        the device sends those windows again, they are stored once, and
        acknowledged then.
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
        refused = [
            info.rc
            for info in (
                client._client.publish(
                    acks_topic(self.config.namespace, ack.device_id),
                    ack.model_dump_json().encode(),
                    qos=1,
                    retain=False,
                )
                for ack in messages
            )
            if info.rc != MQTT_ERR_SUCCESS
        ]
        if refused:
            log.warning(
                "%d of %d window acks were not sent (%s); those windows will be sent again",
                len(refused),
                len(messages),
                error_string(refused[0]),
            )

    async def publish_desired(self, desired: DesiredState) -> None:
        """Publish a device's desired state, retained (later if disconnected)."""
        client = self._client
        if client is None:
            self._pending[desired.device_id] = desired
            return
        try:
            await self._publish_desired(client, desired)
        except aiomqtt.MqttError:
            self._pending[desired.device_id] = desired

    async def _publish_desired(self, client: aiomqtt.Client, desired: DesiredState) -> None:
        topic = desired_topic(self.config.namespace, desired.device_id)
        await client.publish(topic, desired.model_dump_json().encode(), qos=1, retain=True)

    async def _republish(self, client: aiomqtt.Client) -> None:
        try:
            rows = await store.assigned_devices(self.db)
        except Exception as exc:  # the database is away: ingest goes on, it waits for it
            log.warning(
                "cannot read the assigned devices to publish their desired states again "
                "(%s); publishing those of this run only",
                exc,
            )
            rows = []
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
            await self._publish_desired(client, desired)
