"""The agent's MQTT link to the fleet (topics: :mod:`protocol.topics`).

While connected the link

- keeps ``presence`` retained: online on connect, offline as the MQTT last
  will (the broker publishes it when the connection dies without a goodbye)
  and on a clean shutdown;
- keeps ``state`` retained: a :class:`~protocol.messages.ReportedState` on
  connect and whenever the install journal, the serving slots or the hybrid plan change;
- sends each install event as a :class:`~protocol.messages.DeviceEvent`
  (QoS 1; events recorded while offline wait in a small bounded queue);
- sends a :class:`~protocol.messages.Heartbeat` every ``mqtt.heartbeat_interval_s``
  with the requests each stage of the fallback chain answered;
- listens on its own retained ``desired`` topic, where the server says that
  the director's assignment changed, and asks for an update check at once.

The link is one task of the agent's event loop. Nothing in it blocks serving:
the connect runs in a worker thread (aiomqtt), sending happens in this task,
and the installer only queues. When the broker is unreachable or drops the
connection the link retries with jittered exponential backoff, forever; the
backoff starts over only after a connection that held for a while, so two
devices fighting over one client id do not hammer the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import aiomqtt
from pydantic import BaseModel

import agent
from agent.config import AgentConfig, ConfigError
from agent.mqtt.backoff import Backoff
from agent.mqtt.reports import (
    IgnoredDesiredState,
    device_event,
    heartbeat,
    parse_desired,
    presence,
    reported_state,
    same_state,
    shadow_ref,
    state_payload,
)
from agent.mqtt.settings import read_password, tls_context
from agent.ota.journal import Journal
from protocol.broker_url import parse_broker_url
from protocol.inference import StageName
from protocol.manifest import Manifest
from protocol.messages import (
    DesiredState,
    DeviceEvent,
    HybridPlanState,
    ReportedState,
    WindowAck,
)
from protocol.topics import (
    MAX_PAYLOAD_BYTES,
    acks_topic,
    desired_topic,
    device_topic,
    windows_topic,
)

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 100
STABLE_CONNECTION_S = 30.0
OPERATION_TIMEOUT_S = 10.0
# On shutdown: how long the last state, events and the offline presence may take.
GOODBYE_TIMEOUT_S = 2.0

OnDesired = Callable[[DesiredState], None]


class ServingModel(Protocol):
    @property
    def manifest(self) -> Manifest: ...


class InstallerView(Protocol):
    """What the link reports of the installer (:class:`~agent.ota.installer.Installer`)."""

    @property
    def journal(self) -> Journal: ...

    @property
    def active(self) -> ServingModel | None: ...

    @property
    def previous(self) -> ServingModel | None: ...


class StageCount(Protocol):
    @property
    def served(self) -> int: ...


class ShadowView(Protocol):
    """What the state reports of a running shadow (:class:`~agent.serving.shadow.ShadowRunner`)."""

    bundle_id: str
    manifest: Manifest


class ChainView(Protocol):
    """What the heartbeat and the state report of the chain
    (:class:`~agent.serving.chain.FallbackChain`)."""

    @property
    def counters(self) -> Mapping[StageName, StageCount]: ...

    @property
    def shadow(self) -> ShadowView | None: ...


class WindowOutbox(Protocol):
    """The telemetry windows waiting for the server (:class:`~agent.telemetry.outbox.Outbox`)."""

    def pending(
        self, limit: int = 100, *, resend_after_s: float | None = None
    ) -> list[tuple[str, bytes]]: ...

    def mark_sent(self, window_ids: Iterable[str], at: float | None = None) -> None: ...

    def acknowledge(self, window_ids: Iterable[str]) -> int: ...


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _is_mqtt_error(exc: BaseException) -> bool:
    """A broker or network problem (retry quietly), not a bug in the link (log it loudly)."""
    return isinstance(_first_leaf(exc), aiomqtt.MqttError | OSError)


def _describe(exc: BaseException) -> str:
    exc = _first_leaf(exc)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if exc.__cause__ is not None:
        text += f" ({exc.__cause__})"
    return text


class MqttLink:
    """The device's connection to the broker at ``config.server.broker``.

    ``installer`` and ``chain`` are read for the reported state and the
    heartbeat; :meth:`record` is the installer's event listener; ``on_desired``
    is called (on the event loop) for each new desired state addressed to this
    device. Run it with :meth:`run` as a task; it returns once ``stop`` is set.

    Raises :class:`~agent.config.ConfigError` when there is no broker to talk
    to, or the password or CA file cannot be used (both are read once, here).
    """

    def __init__(
        self,
        config: AgentConfig,
        installer: InstallerView,
        chain: ChainView,
        on_desired: OnDesired,
        *,
        outbox: WindowOutbox | None = None,
        hybrid_plan: Callable[[], HybridPlanState | None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.server.broker is None:
            raise ConfigError("server.broker: no MQTT broker is configured")
        if config.mqtt.namespace is None:
            raise ConfigError("mqtt.namespace: no topic namespace is configured")
        address = parse_broker_url(config.server.broker)  # validated with the config
        self.broker = config.server.broker
        self.device_id = config.device_id
        self.namespace = config.mqtt.namespace
        self._config = config
        self._host = address.host
        tls = address.tls
        self._port = address.port
        # Read once, at start: a bad CA or password file stops the agent with a clear message.
        self._tls = tls_context(config.mqtt.ca_file) if tls else None
        self._password = read_password(config.credentials.password_file)
        self._username = config.credentials.username
        if self._username is None and self._password is not None:
            self._username = config.device_id
        self._installer = installer
        self._chain = chain
        self._on_desired = on_desired
        self._hybrid_plan = hybrid_plan
        self._clock = clock
        self._monotonic = monotonic
        self._started = monotonic()
        self._events: deque[DeviceEvent] = deque(maxlen=MAX_PENDING_EVENTS)
        self._dropped_events = 0
        self._changed = asyncio.Event()
        self._reported: ReportedState | None = None
        self._director_version: int | None = None
        self._topics = {
            channel: device_topic(self.namespace, self.device_id, channel)
            for channel in ("state", "events", "heartbeat", "presence")
        }
        self._desired = desired_topic(self.namespace, self.device_id)
        self._outbox = outbox
        self._windows = windows_topic(self.namespace, self.device_id)
        self._acks = acks_topic(self.namespace, self.device_id)
        self.connected = False
        """Whether the link is connected to the broker right now."""
        self.reconnects = 0
        """Connections made since the first one (each follows a lost connection)."""
        self._connections = 0
        self._connected_at: float | None = None

    # -- what the rest of the agent calls ------------------------------------------

    def record(self, event: Mapping[str, object]) -> None:
        """Queue one installer event, and the state change behind it, for the broker.

        Never blocks and never raises; when the queue is full (a long outage)
        the oldest event goes (``events.jsonl`` on the device keeps them all).
        """
        if len(self._events) == self._events.maxlen:
            self._dropped_events += 1
            if self._dropped_events in (1, 10, 100) or self._dropped_events % 1000 == 0:
                log.warning("mqtt: %d events dropped while offline", self._dropped_events)
        self._events.append(device_event(self.device_id, event, self._clock()))
        self._changed.set()

    def windows_waiting(self) -> None:
        """New windows are in the outbox: send them soon."""
        self._changed.set()

    def state_changed(self) -> None:
        """Something the state reports changed (the hybrid plan): report it soon."""
        self._changed.set()

    def current_state(self) -> ReportedState:
        """What the device would report now."""
        installer = self._installer
        shadow = self._chain.shadow
        return reported_state(
            device_id=self.device_id,
            hardware_id=self._config.hardware_id,
            agent_version=agent.__version__,
            journal=installer.journal,
            active=installer.active.manifest if installer.active else None,
            previous=installer.previous.manifest if installer.previous else None,
            sent_at=self._clock(),
            shadow=shadow_ref(shadow.bundle_id, shadow.manifest) if shadow else None,
            hybrid_plan=self._hybrid_plan() if self._hybrid_plan is not None else None,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected (reconnecting with backoff) until ``stop`` is set."""
        mqtt = self._config.mqtt
        backoff = Backoff(mqtt.reconnect_min_s, mqtt.reconnect_max_s)
        while not stop.is_set():
            session = asyncio.create_task(self._session(stop))
            stopped = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait(
                    {session, stopped}, return_when=asyncio.FIRST_COMPLETED
                )
                if session not in done:
                    if not self.connected:
                        session.cancel()  # still connecting: do not hold up shutdown
                    await asyncio.wait({session})
            finally:
                stopped.cancel()
                if not session.done():
                    session.cancel()
            if session.cancelled() or stop.is_set():
                return
            error = session.exception()
            held = self._monotonic() - self._connected_at if self._connected_at else 0.0
            if held >= STABLE_CONNECTION_S:
                backoff.reset()
            delay = backoff.next_delay()
            log.log(
                logging.WARNING if error is None or _is_mqtt_error(error) else logging.ERROR,
                "mqtt: no connection to %s (%s); retrying in %.1f s",
                self.broker,
                _describe(error) if error else "disconnected",
                delay,
                exc_info=error if error is not None and not _is_mqtt_error(error) else None,
            )
            await _wait(stop, delay)

    # -- one connection ------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        mqtt = self._config.mqtt
        offline = presence(self.device_id, online=False, sent_at=self._clock())
        return aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            identifier=mqtt.client_id or f"{self.namespace}-{self.device_id}",
            will=aiomqtt.Will(self._topics["presence"], _json(offline), qos=1, retain=True),
            clean_session=True,
            keepalive=mqtt.keepalive_s,
            timeout=OPERATION_TIMEOUT_S,
            max_queued_incoming_messages=16,
            tls_context=self._tls,
        )

    async def _session(self, stop: asyncio.Event) -> None:
        self._reported = None
        self._connected_at = None
        async with self._client() as client:
            self.connected = True
            self._connections += 1
            self.reconnects = self._connections - 1
            self._connected_at = self._monotonic()
            log.info("mqtt: connected to %s as %s", self.broker, self.device_id)
            try:
                await client.subscribe(self._desired, qos=1)
                if self._outbox is not None:
                    await client.subscribe(self._acks, qos=1)
                online = presence(self.device_id, online=True, sent_at=self._clock())
                await self._publish(client, "presence", online, qos=1, retain=True)
                await self._flush(client, force_state=True)
                async with asyncio.TaskGroup() as tasks:
                    running = [
                        tasks.create_task(self._receive(client)),
                        tasks.create_task(self._send(client)),
                        tasks.create_task(self._heartbeats(client)),
                    ]
                    await stop.wait()
                    for task in running:
                        task.cancel()
                await self._goodbye(client)
            finally:
                self.connected = False

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """Last state and events, then offline presence: a clean exit sends no last will."""
        try:
            async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                await self._flush(client)
                offline = presence(self.device_id, online=False, sent_at=self._clock())
                await self._publish(client, "presence", offline, qos=1, retain=True)
        except (TimeoutError, aiomqtt.MqttError) as exc:
            log.warning("mqtt: no clean goodbye: %s", _describe(exc))

    async def _publish(
        self,
        client: aiomqtt.Client,
        channel: str,
        message: BaseModel,
        *,
        qos: int,
        retain: bool = False,
    ) -> None:
        await client.publish(self._topics[channel], _json(message), qos=qos, retain=retain)

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._flush(client)

    async def _flush(self, client: aiomqtt.Client, force_state: bool = False) -> None:
        while self._events:
            event = self._events[0]
            await self._publish(client, "events", event, qos=1)
            # While that was in flight a full queue may have dropped it already.
            if self._events and self._events[0] is event:
                self._events.popleft()
        await self._send_windows(client)
        state = self.current_state()
        if force_state or self._reported is None or not same_state(state, self._reported):
            await self._publish(client, "state", state, qos=1, retain=True)
            self._reported = state

    async def _send_windows(self, client: aiomqtt.Client) -> None:
        """Telemetry windows not yet acknowledged by the server (again after the timeout)."""
        outbox = self._outbox
        if outbox is None:
            return
        timeout = self._config.telemetry.ack_timeout_s
        while batch := await asyncio.to_thread(outbox.pending, 20, resend_after_s=timeout):
            for window_id, payload in batch:
                await client.publish(self._windows, payload, qos=1)
                await asyncio.to_thread(outbox.mark_sent, [window_id])
            if len(batch) < 20:
                return

    def _acknowledged(self, payload: bytes) -> None:
        if self._outbox is None:
            return
        try:
            ack = WindowAck.model_validate_json(payload)
        except ValueError as exc:
            log.warning("mqtt: ignored a message on %s: %s", self._acks, str(exc)[:200])
            return
        if ack.device_id != self.device_id:
            log.warning("mqtt: ignored an acknowledgement for device %s", ack.device_id)
            return
        self._outbox.acknowledge(ack.window_ids)

    async def _heartbeats(self, client: aiomqtt.Client) -> None:
        interval = self._config.mqtt.heartbeat_interval_s
        while True:
            served: dict[str, int] = {s: c.served for s, c in self._chain.counters.items()}
            beat = heartbeat(
                self.device_id, self._monotonic() - self._started, served, self._clock()
            )
            await self._publish(client, "heartbeat", beat, qos=0)
            self._changed.set()  # also the moment to resend windows still unacknowledged
            await asyncio.sleep(interval)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if message.topic.matches(self._desired) and isinstance(payload, bytes):
                self._desired_state(payload)
            elif message.topic.matches(self._acks) and isinstance(payload, bytes):
                self._acknowledged(payload)

    def _desired_state(self, payload: bytes) -> None:
        if not payload:
            return  # the server cleared the retained desired state
        if len(payload) > MAX_PAYLOAD_BYTES:
            log.warning("mqtt: ignored a %d-byte message on %s", len(payload), self._desired)
            return
        try:
            desired = parse_desired(self.device_id, payload)
        except IgnoredDesiredState as exc:
            log.warning("mqtt: ignored a message on %s: %s", self._desired, exc)
            return
        if desired.director_version == self._director_version:
            return  # already acted on (a retained message comes again on every reconnect)
        self._director_version = desired.director_version
        log.info(
            "mqtt: desired state changed (director version %d); checking for updates now",
            desired.director_version,
        )
        try:
            self._on_desired(desired)
        except Exception:  # the link must outlive a failing listener
            log.exception("mqtt: desired-state listener failed")


def _json(message: BaseModel) -> bytes:
    if isinstance(message, ReportedState):
        return state_payload(message)
    return message.model_dump_json().encode()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
