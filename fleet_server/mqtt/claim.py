"""A deployment's hold on its MQTT namespace, and each replica's on its id.

Rules, checked once at start, before the replica ingests anything:

1. A namespace belongs to one deployment. The first server of a deployment
   publishes a retained *claim* (:class:`NamespaceClaim`, its deployment id:
   a digest of its database) on ``edgefleet/v1/{namespace}/server/claim``. A
   server whose claim is there already starts only if the claim is its own
   deployment's: replicas of one database share a namespace, a second
   deployment on the same broker and namespace is refused, naming
   ``--mqtt-namespace``. (Only the servers' broker user may touch
   ``server/``; devices cannot forge or clear a claim.)
2. A replica id belongs to one running replica, since the ingest connection's
   MQTT client id is made from it and a broker disconnects the older of two
   clients with one id. Each replica keeps a retained record
   (:class:`ReplicaRecord`) on ``server/replicas/{replica_id}``, ``online``
   while it runs and ``offline`` through its last will. A new replica that
   finds the record ``online`` pings ``server/replicas/{replica_id}/ping``: a
   live holder answers on ``.../pong`` and the new one is refused, naming
   ``--replica-id``; a holder that died without a goodbye (SIGKILL, its will
   not yet sent) does not answer, and the new one takes over, as a
   supervisor's restart should. Two replicas that start with one id at the
   same moment can both pass that check; each then sees the other's record,
   and the one with the lower instance id keeps the id while the other stops
   with the same refusal.
3. A broker URL the server cannot connect to is refused at start, naming ``--mqtt``.

The retained messages a subscription brings arrive before anything published
later on the same connection, so the checks read them behind an *echo* (a
message the server sends itself) rather than after a fixed wait. The guard
holds its own connection (random client id) for as long as the replica runs,
answering pings and keeping its record; should two deployments start at the
same moment and both find the namespace free, each sees the other's claim
arrive and logs an error naming ``--mqtt-namespace``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

import aiomqtt
from pydantic import BaseModel, ConfigDict, ValidationError

from fleet_server.config import ServerConfig
from fleet_server.tls import TLSConfigError, client_context
from protocol.broker_url import parse_broker_url
from protocol.topics import server_topic

log = logging.getLogger(__name__)

# How long the broker may take to echo our own message back (it has the claim by then).
ECHO_TIMEOUT_S = 10.0
# How long a live holder of the replica id has to answer a ping.
PING_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 10.0


class StartRefused(Exception):
    """The server must not start; ``flag`` is the command-line flag to change."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class NamespaceClaim(BaseModel):
    """Which deployment owns a namespace (retained on ``server/claim``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    deployment: str
    database: str
    replica: str
    claimed_at: float


class ReplicaRecord(BaseModel):
    """Whether a replica id is in use (retained on ``server/replicas/{id}``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    deployment: str
    instance: str
    online: bool
    at: float


class NamespaceGuard:
    """Checks the rules above at :meth:`start`, then upholds them while :meth:`run` runs."""

    def __init__(self, config: ServerConfig) -> None:
        if config.mqtt_url is None:
            raise ValueError("the namespace guard needs a broker")
        self.config = config
        self.namespace = config.namespace
        self.instance = secrets.token_hex(8)
        self._address = parse_broker_url(config.mqtt_url)
        rid = config.replica_id
        self.claim_topic = server_topic(self.namespace, "claim")
        self.record_topic = server_topic(self.namespace, f"replicas/{rid}")
        self.ping_topic = server_topic(self.namespace, f"replicas/{rid}/ping")
        self.pong_topic = server_topic(self.namespace, f"replicas/{rid}/pong")
        self.echo_topic = server_topic(self.namespace, f"echo/{self.instance}")
        self._stack = contextlib.AsyncExitStack()
        self._client: aiomqtt.Client | None = None

    # -- start -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check the claim and the replica id, then hold both; or :class:`StartRefused`."""
        try:
            self._client = await self._stack.enter_async_context(self._new_client())
        except TLSConfigError as exc:
            await self._stack.aclose()
            raise StartRefused("--mqtt-ca-file", str(exc)) from None
        except aiomqtt.MqttError as exc:
            await self._stack.aclose()
            raise StartRefused(
                "--mqtt", f"cannot connect to the broker at {self.config.mqtt_url}: {exc}"
            ) from None
        try:
            await self._check(self._client)
        except BaseException:
            await self._stack.aclose()
            raise

    async def _check(self, client: aiomqtt.Client) -> None:
        for topic in (self.claim_topic, self.record_topic, self.pong_topic, self.echo_topic):
            await client.subscribe(topic, qos=1)
        await client.publish(self.echo_topic, self.instance.encode(), qos=1)
        claim: bytes | None = None
        record: bytes | None = None
        try:
            async with asyncio.timeout(ECHO_TIMEOUT_S):
                async for message in client.messages:
                    topic, payload = str(message.topic), _bytes(message.payload)
                    if topic == self.claim_topic:
                        claim = payload
                    elif topic == self.record_topic:
                        record = payload
                    elif topic == self.echo_topic:
                        break
        except TimeoutError:
            raise StartRefused(
                "--mqtt",
                f"the broker at {self.config.mqtt_url} did not deliver this server's own "
                f"message on {self.echo_topic}; does its ACL let the server user use "
                f"edgefleet/v1/{self.namespace}/server/#? (fleetctl broker config --namespace "
                f"{self.namespace})",
            ) from None
        self._check_claim(claim)
        if record is not None:
            await self._check_replica(client, record)
        await client.unsubscribe(self.echo_topic)
        await client.unsubscribe(self.pong_topic)
        await client.publish(self.claim_topic, self._claim().encode(), qos=1, retain=True)
        await client.publish(self.record_topic, self._record(online=True), qos=1, retain=True)
        await client.subscribe(self.ping_topic, qos=1)
        log.info(
            "MQTT namespace %s (deployment %s) claimed; replica %s",
            self.namespace,
            self.config.deployment_id[:12],
            self.config.replica_id,
        )

    def _check_claim(self, payload: bytes | None) -> None:
        if not payload:
            return
        try:
            claim = NamespaceClaim.model_validate_json(payload)
        except ValidationError:
            raise StartRefused(
                "--mqtt-namespace",
                f"namespace {self.namespace!r} on {self.config.mqtt_url} holds an unreadable "
                f"claim on {self.claim_topic}; choose another namespace, or clear that retained "
                "message if nothing uses the namespace",
            ) from None
        if claim.deployment != self.config.deployment_id:
            raise StartRefused(
                "--mqtt-namespace",
                f"namespace {self.namespace!r} on {self.config.mqtt_url} belongs to another "
                f"deployment (database {claim.database}, claimed by replica {claim.replica}); "
                f"this server's database is {self.config.deployment}. Give this server its own "
                f"--mqtt-namespace, or clear the retained claim on {self.claim_topic} if that "
                "deployment is gone",
            )

    async def _check_replica(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            record = ReplicaRecord.model_validate_json(payload)
        except ValidationError:
            return  # not a record a replica wrote; ours replaces it
        if not record.online or record.instance == self.instance:
            return
        await client.publish(self.ping_topic, self.instance.encode(), qos=1)
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                async for message in client.messages:
                    if (
                        str(message.topic) == self.pong_topic
                        and _bytes(message.payload).split(b" ")[-1] == self.instance.encode()
                    ):
                        raise StartRefused(
                            "--replica-id",
                            f"a running replica already uses replica id "
                            f"{self.config.replica_id!r} in namespace {self.namespace!r} on "
                            f"{self.config.mqtt_url} (its MQTT client id would be taken over); "
                            "give every replica its own --replica-id",
                        )
        except TimeoutError:
            log.info(
                "replica id %s was last held by instance %s, which does not answer; taking over",
                self.config.replica_id,
                record.instance,
            )

    async def close(self) -> None:
        """Disconnect without :meth:`run` (a start that failed after :meth:`start`)."""
        self._client = None
        await self._stack.aclose()

    # -- while the replica runs ------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Answer pings for this replica id and keep its record until ``stop``; then say offline."""
        delay = 0.5
        while not stop.is_set():
            try:
                client = self._client
                if client is None:
                    client = await self._stack.enter_async_context(self._new_client())
                    self._client = client
                    await client.publish(
                        self.record_topic, self._record(online=True), qos=1, retain=True
                    )
                    await client.subscribe(self.ping_topic, qos=1)
                    await client.subscribe(self.claim_topic, qos=1)
                await client.subscribe(self.record_topic, qos=1)
                delay = 0.5
                reader = asyncio.create_task(self._serve(client))
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for task in (reader, stopper):
                    task.cancel()
                await asyncio.gather(reader, stopper, return_exceptions=True)
                if stop.is_set():
                    with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                        async with asyncio.timeout(2.0):
                            await client.publish(
                                self.record_topic, self._record(online=False), qos=1, retain=True
                            )
                elif reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
            except aiomqtt.MqttError as exc:
                log.warning("namespace guard lost the broker (%s); retrying in %.1f s", exc, delay)
            finally:
                self._client = None
                await self._stack.aclose()
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 30.0)

    async def _serve(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic, payload = str(message.topic), _bytes(message.payload)
            if topic == self.ping_topic and payload and payload != self.instance.encode():
                # "<our instance> <the asker's>": the asker knows it is its own ping answered.
                answer = f"{self.instance} ".encode() + payload[:64]
                await client.publish(self.pong_topic, answer, qos=1)
            elif topic == self.claim_topic and payload:
                try:
                    claim = NamespaceClaim.model_validate_json(payload)
                except ValidationError:
                    claim = None
                if claim is None or claim.deployment != self.config.deployment_id:
                    # Two deployments started at the same moment both found the namespace
                    # free; the broker keeps the later claim, and both must hear of it.
                    log.error(
                        "another deployment (%s) claimed MQTT namespace %s, which this one "
                        "uses: give one of them its own --mqtt-namespace",
                        claim.database if claim else "an unreadable claim",
                        self.namespace,
                    )
            elif topic == self.record_topic and payload:
                try:
                    record = ReplicaRecord.model_validate_json(payload)
                except ValidationError:
                    continue
                if record.instance == self.instance:
                    continue
                if not record.online:
                    # A dead predecessor's last will, arriving late: the id is ours.
                    await client.publish(
                        self.record_topic, self._record(online=True), qos=1, retain=True
                    )
                elif record.instance < self.instance:
                    # Two replicas started with one id at the same moment both passed the
                    # check; the lower instance keeps the id, so exactly one goes on.
                    raise StartRefused(
                        "--replica-id",
                        f"another running replica (instance {record.instance}) uses replica id "
                        f"{self.config.replica_id!r} too; it keeps the id and this replica "
                        "stops: give each replica its own --replica-id",
                    )
                else:
                    log.error(
                        "another running replica (instance %s) uses replica id %s: this one "
                        "keeps the id and the other stops; give each its own --replica-id",
                        record.instance,
                        self.config.replica_id,
                    )
                    await client.publish(
                        self.record_topic, self._record(online=True), qos=1, retain=True
                    )

    # -- plumbing ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _new_client(self) -> AsyncIterator[aiomqtt.Client]:
        tls = None
        if self._address.tls:
            tls = client_context(self.config.mqtt_ca_file)
        client = aiomqtt.Client(
            self._address.host,
            self._address.port,
            username=self.config.mqtt_username,
            password=self.config.mqtt_password,
            identifier=f"edgefleet-guard-{self.namespace}-{self.instance}",
            will=aiomqtt.Will(self.record_topic, self._record(online=False), qos=1, retain=True),
            clean_session=True,
            keepalive=30,
            timeout=CONNECT_TIMEOUT_S,
            tls_context=tls,
        )
        async with client:
            yield client

    def _claim(self) -> str:
        return NamespaceClaim(
            deployment=self.config.deployment_id,
            database=self.config.deployment,
            replica=self.config.replica_id,
            claimed_at=time.time(),
        ).model_dump_json()

    def _record(self, *, online: bool) -> bytes:
        return (
            ReplicaRecord(
                deployment=self.config.deployment_id,
                instance=self.instance,
                online=online,
                at=time.time(),
            )
            .model_dump_json()
            .encode()
        )


def _bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()
