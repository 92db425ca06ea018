"""The fault proxy between devices and the broker, the server's HTTP and the cloud endpoint.

Real targets only: the shared Mosquitto at 127.0.0.1:1883 (each test under a
topic prefix and client ids of its own) and a real aiohttp server on a free
port. Times are asserted as lower bounds only (a fault adds at least what was
set); how long anything else takes on a loaded machine is never asserted, and
waits for something to happen have generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import paho.mqtt.client as paho
import pytest
import pytest_asyncio
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from simulator.proxy import (
    BURST_MIN_BYTES,
    BURST_S,
    HIGH_WATER_BYTES,
    CloudFaultProxy,
    FaultProxy,
    LinkFaults,
    ProxyError,
)

pytestmark = pytest.mark.integration

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 1883
WAIT_S = 60.0
ASYNCIO_READ_BYTES = 256 * 1024  # the most a selector transport reads at once


async def eventually(what: str, probe: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll ``probe`` without blocking the loop until it is true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


def pattern(size: int) -> bytes:
    """``size`` bytes that are not all alike, so a reordered or altered byte shows."""
    block = hashlib.sha256(str(size).encode()).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


# --- a real HTTP target -----------------------------------------------------------------


class HttpTarget:
    """An aiohttp server: echoes bodies, serves N bytes, answers inference requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/echo", self._echo)
        app.router.add_get("/bytes/{size}", self._bytes)
        app.router.add_post("/v2/models/{name}/infer", self._infer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        self.port = listening.getsockname()[1]
        await web.SockSite(self._runner, listening).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _echo(self, request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def _bytes(self, request: web.Request) -> web.Response:
        return web.Response(body=pattern(int(request.match_info["size"])))

    async def _infer(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(
            (request.match_info["name"], request.query_string, dict(request.headers))
        )
        return web.json_response(
            {"model_name": request.match_info["name"], "id": body.get("id"), "outputs": []},
            headers={"X-Served-By": "target"},
        )


@pytest_asyncio.fixture
async def http_target() -> AsyncIterator[HttpTarget]:
    target = HttpTarget()
    await target.start()
    yield target
    await target.close()


@pytest_asyncio.fixture
async def http_proxy(http_target: HttpTarget) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", http_target.port, seed=7, name="server-http")
    yield proxy
    await proxy.close()


@pytest_asyncio.fixture
async def broker_proxy() -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(BROKER_HOST, BROKER_PORT, seed=11, name="broker")
    yield proxy
    await proxy.close()


# --- MQTT clients -----------------------------------------------------------------------


class Peer:
    """A paho client on its own network thread that reconnects by itself, as devices do."""

    def __init__(self, port: int, *, client_id: str | None = None, clean: bool = True) -> None:
        self.client_id = client_id or f"proxy-test-{uuid.uuid4().hex[:12]}"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.received: list[tuple[str, bytes]] = []
        self.connects = 0
        self.disconnects = 0
        self.subscriptions: list[str] = []
        self.subacks = 0
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect_async(BROKER_HOST, port, keepalive=30)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self.subscriptions.append(topic)
        if self.client.is_connected():
            self.client.subscribe(topic, qos=1)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [payload for _, payload in self.received]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self.connects += 1
            for topic in self.subscriptions:
                client.subscribe(topic, qos=1)

    def _on_subscribe(self, *_: Any) -> None:
        self.subacks += 1

    def _on_disconnect(self, *_: Any) -> None:
        self.disconnects += 1

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, bytes(message.payload)))


def connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session and a 60 s keep-alive."""
    name = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(name).to_bytes(2, "big") + name
    assert len(body) < 128  # one byte of remaining length
    return bytes([0x10, len(body)]) + body


CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


async def mqtt_session(
    port: int, client_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw MQTT connection on ``port`` that the broker accepted."""
    reader, writer = await asyncio.open_connection(BROKER_HOST, port)
    writer.write(connect_packet(client_id))
    assert await reader.readexactly(4) == CONNACK_ACCEPTED
    return reader, writer


async def was_reset(reader: asyncio.StreamReader) -> bool:
    """Whether the connection ends in a reset (not an orderly end of stream)."""
    try:
        await reader.read(1)
    except ConnectionResetError:
        return True
    return False


@pytest.fixture
def prefix() -> Iterator[str]:
    yield f"test/proxy/{uuid.uuid4().hex[:12]}"


# --- bytes pass unchanged ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_http_bodies_pass_unchanged_both_ways(
    http_target: HttpTarget, http_proxy: FaultProxy
) -> None:
    port = await http_proxy.open("plain")
    body = pattern(3_000_000)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/echo", data=body) as answer,
    ):
        assert answer.status == 200
        assert await answer.read() == body
    stats = http_proxy.stats()["plain"]
    assert stats.opened == 1
    assert stats.bytes_up > len(body) and stats.bytes_down > len(body)


@pytest.mark.asyncio
async def test_mqtt_messages_pass_unchanged_through_the_proxy(
    broker_proxy: FaultProxy, prefix: str
) -> None:
    port = await broker_proxy.open("devices")
    subscriber = Peer(port)
    subscriber.subscribe(f"{prefix}/#")
    publisher = Peer(port)
    try:
        await eventually(
            "both clients connected", lambda: subscriber.connects and publisher.connects
        )
        await eventually("the subscription", lambda: subscriber.subacks)
        sent = [os.urandom(n) for n in (1, 100, 10_000, 200_000)]
        for payload in sent:
            publisher.client.publish(f"{prefix}/data", payload, qos=1)
        await eventually("every message", lambda: len(subscriber.payloads()) >= len(sent))
        assert subscriber.payloads() == sent
    finally:
        publisher.stop()
        subscriber.stop()


# --- latency, jitter, loss --------------------------------------------------------------


@pytest.mark.asyncio
async def test_latency_is_added_each_way_and_applies_to_open_connections(
    http_target: HttpTarget, http_proxy: FaultProxy
) -> None:
    port = await http_proxy.open("slow")
    url = f"http://127.0.0.1:{port}/echo"
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, data=b"warm") as answer:
            assert await answer.read() == b"warm"
        http_proxy.set("slow", LinkFaults(latency_ms=150))
        started = time.monotonic()
        async with session.post(url, data=b"late") as answer:
            assert await answer.read() == b"late"
        elapsed = time.monotonic() - started
    assert elapsed >= 2 * 0.150  # one request up, one answer down
    assert http_proxy.stats()["slow"].opened == 1  # the open connection felt the change
    assert http_proxy.faults("slow") == LinkFaults(latency_ms=150)


@pytest.mark.asyncio
async def test_jitter_never_reorders_a_direction(broker_proxy: FaultProxy, prefix: str) -> None:
    port = await broker_proxy.open("jittery")
    subscriber = Peer(BROKER_PORT)
    subscriber.subscribe(f"{prefix}/#")
    publisher = Peer(port)
    try:
        await eventually(
            "both clients connected", lambda: subscriber.connects and publisher.connects
        )
        await eventually("the subscription", lambda: subscriber.subacks)
        broker_proxy.set("jittery", LinkFaults(latency_ms=5, jitter_ms=40))
        sent = [str(i).encode() for i in range(200)]
        for payload in sent:
            publisher.client.publish(f"{prefix}/seq", payload, qos=0)
            await asyncio.sleep(0.002)  # separate chunks, each with its own draw of jitter
        await eventually("every message", lambda: len(subscriber.payloads()) >= len(sent))
        assert subscriber.payloads() == sent
        assert broker_proxy.stats()["jittery"].chunks_up > 20
    finally:
        publisher.stop()
        subscriber.stop()


@pytest.mark.asyncio
async def test_loss_delays_chunks_as_retransmissions_and_loses_nothing(
    broker_proxy: FaultProxy, prefix: str
) -> None:
    port = await broker_proxy.open("lossy")
    subscriber = Peer(BROKER_PORT)
    subscriber.subscribe(f"{prefix}/#")
    publisher = Peer(port)
    try:
        await eventually(
            "both clients connected", lambda: subscriber.connects and publisher.connects
        )
        await eventually("the subscription", lambda: subscriber.subacks)
        broker_proxy.set("lossy", LinkFaults(loss=0.3))
        sent = [str(i).encode() for i in range(40)]
        started = time.monotonic()
        for payload in sent:
            publisher.client.publish(f"{prefix}/seq", payload, qos=0)  # QoS 0: TCP alone
            await asyncio.sleep(0.005)
        await eventually("every message", lambda: len(subscriber.payloads()) >= len(sent))
        elapsed = time.monotonic() - started
        assert subscriber.payloads() == sent
        stats = broker_proxy.stats()["lossy"]
        assert stats.retransmits >= 1
        assert stats.cut == 0 and stats.retransmit_resets == 0
        assert elapsed >= 0.2  # at least one retransmission timeout
    finally:
        publisher.stop()
        subscriber.stop()


# --- down and cut -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_down_refuses_and_cuts_and_qos1_clients_lose_nothing_after_it_lifts(
    broker_proxy: FaultProxy, prefix: str
) -> None:
    port = await broker_proxy.open("site")
    # A device publishing up and a device with a persistent session receiving down, both
    # behind the proxy; the "server" talks to the broker directly.
    server = Peer(BROKER_PORT)
    server.subscribe(f"{prefix}/up")
    sender = Peer(port)
    receiver_id = f"proxy-test-{uuid.uuid4().hex[:12]}"
    receiver = Peer(port, client_id=receiver_id, clean=False)
    receiver.subscribe(f"{prefix}/down")
    try:
        await eventually(
            "all connected", lambda: server.connects and sender.connects and receiver.connects
        )
        await eventually("the subscriptions", lambda: server.subacks and receiver.subacks)
        up = [f"up-{i}".encode() for i in range(100)]
        down = [f"down-{i}".encode() for i in range(100)]
        for i in range(50):
            sender.client.publish(f"{prefix}/up", up[i], qos=1)
            server.client.publish(f"{prefix}/down", down[i], qos=1)
        await eventually("the first half", lambda: len(set(server.payloads())) >= 50)

        broker_proxy.set("site", LinkFaults(down=True))
        stats = broker_proxy.stats()["site"]
        assert stats.cut == 2 and stats.open == 0
        await eventually(
            "both devices see the cut", lambda: sender.disconnects and receiver.disconnects
        )
        reader, writer = await asyncio.open_connection(BROKER_HOST, port)
        assert await was_reset(reader)
        writer.close()
        for i in range(50, 100):
            sender.client.publish(f"{prefix}/up", up[i], qos=1)  # held by the device's client
            server.client.publish(f"{prefix}/down", down[i], qos=1)  # held in the broker session
        await eventually(
            "a device's reconnect refused", lambda: broker_proxy.stats()["site"].refused >= 2
        )
        assert set(server.payloads()) <= set(up[:50])

        broker_proxy.set("site", LinkFaults())
        await eventually("every message up", lambda: set(server.payloads()) == set(up))
        await eventually("every message down", lambda: set(receiver.payloads()) == set(down))
        assert sender.connects >= 2 and receiver.connects >= 2
        assert broker_proxy.stats()["site"].opened >= 4
    finally:
        sender.stop()
        receiver.stop()
        server.stop()
        forget = Peer(BROKER_PORT, client_id=receiver_id, clean=True)  # drop the stored session
        await eventually("the session dropped", lambda: forget.connects)
        forget.stop()


@pytest.mark.asyncio
async def test_cut_resets_all_500_open_connections_and_they_may_reconnect(
    broker_proxy: FaultProxy, prefix: str
) -> None:
    port = await broker_proxy.open("storm")
    other = await broker_proxy.open("bystanders")
    run = uuid.uuid4().hex[:8]
    sessions = await asyncio.gather(*(mqtt_session(port, f"cut-{run}-{i}") for i in range(500)))
    bystander = await mqtt_session(other, f"cut-{run}-bystander")
    assert broker_proxy.stats()["storm"].open == 500

    assert broker_proxy.cut("storm") == 500

    resets = await asyncio.gather(*(was_reset(reader) for reader, _ in sessions))
    assert all(resets)
    stats = broker_proxy.stats()
    assert stats["storm"].cut == 500 and stats["storm"].open == 0
    assert stats["bystanders"].open == 1 and stats["bystanders"].cut == 0
    for _, writer in sessions:
        writer.close()
    again = await asyncio.gather(*(mqtt_session(port, f"cut-{run}-{i}") for i in range(500)))
    assert broker_proxy.stats()["storm"].opened == 1000
    for _, writer in (*again, bystander):
        writer.close()
    assert prefix  # the clients publish nothing; their ids are the run's own


@pytest.mark.asyncio
async def test_cut_of_all_groups_and_close_leave_no_socket_open(broker_proxy: FaultProxy) -> None:
    def open_sockets() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd") if _is_socket(fd))

    before = open_sockets()
    ports = [await broker_proxy.open(g) for g in ("a", "b")]
    run = uuid.uuid4().hex[:8]
    sessions = [await mqtt_session(p, f"close-{run}-{i}-{p}") for p in ports for i in range(20)]
    assert broker_proxy.cut() == 40
    assert all(await asyncio.gather(*(was_reset(r) for r, _ in sessions)))
    await asyncio.gather(*(hang_up(writer) for _, writer in sessions))
    more = [await mqtt_session(p, f"close-{run}-late-{p}") for p in ports]
    await broker_proxy.close()
    assert all(await asyncio.gather(*(was_reset(r) for r, _ in more)))
    await asyncio.gather(*(hang_up(writer) for _, writer in more))
    await eventually("the proxy's sockets closed", lambda: open_sockets() <= before)


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """Close our end; a connection already reset has nothing more to say."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def _is_socket(fd: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    except OSError:
        return False


@pytest.mark.asyncio
async def test_an_unreachable_target_resets_the_device_and_is_counted() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # now nothing listens on ``port``
    proxy = FaultProxy("127.0.0.1", port)
    try:
        listen = await proxy.open("g")
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        assert await was_reset(reader)
        writer.close()
        stats = proxy.stats()["g"]
        assert stats.target_failed == 1 and stats.opened == 0 and stats.open == 0
    finally:
        await proxy.close()


# --- bandwidth --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_bandwidth_cap_limits_throughput_each_way(
    http_target: HttpTarget, http_proxy: FaultProxy
) -> None:
    port = await http_proxy.open("narrow")
    kbps = 800.0
    rate = kbps * 1000 / 8
    burst = max(BURST_MIN_BYTES, rate * BURST_S)
    size = 200_000
    http_proxy.set("narrow", LinkFaults(bandwidth_kbps=kbps))
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(f"http://127.0.0.1:{port}/bytes/{size}") as answer:
            assert await answer.read() == pattern(size)
        down_s = time.monotonic() - started
        body = pattern(size)
        started = time.monotonic()
        async with session.post(f"http://127.0.0.1:{port}/echo", data=body) as answer:
            assert await answer.read() == body
        echo_s = time.monotonic() - started
    assert down_s >= (size - burst) / rate
    assert echo_s >= (size - burst) / rate


@pytest.mark.asyncio
async def test_a_slow_link_pushes_back_on_the_sender_instead_of_filling_the_proxy(
    http_target: HttpTarget, http_proxy: FaultProxy
) -> None:
    port = await http_proxy.open("trickle")
    http_proxy.set("trickle", LinkFaults(bandwidth_kbps=80, latency_ms=50))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    size = 32 * 1024 * 1024
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    writer.write(bytes(size))  # far more than the link carries in the seconds watched
    held: list[int] = []

    def sample() -> bool:
        held.append(http_proxy.stats()["trickle"].bytes_in_flight)
        return len(held) >= 50

    await eventually("samples of what the proxy holds", sample)
    # Reading pauses once the mark is passed; the read that passed it is up to 256 KiB.
    assert 0 < max(held) <= HIGH_WATER_BYTES + ASYNCIO_READ_BYTES
    assert writer.transport.get_write_buffer_size() > 0  # the sender is the one waiting
    http_proxy.cut("trickle")
    assert await was_reset(reader)
    await hang_up(writer)
    assert http_proxy.stats()["trickle"].bytes_in_flight == 0


# --- the cloud endpoint -----------------------------------------------------------------


@pytest_asyncio.fixture
async def cloud(http_target: HttpTarget) -> AsyncIterator[tuple[CloudFaultProxy, str]]:
    proxy = CloudFaultProxy(f"http://127.0.0.1:{http_target.port}", seed=3)
    url = await proxy.start()
    yield proxy, url
    await proxy.close()


def infer_body(i: int) -> dict[str, Any]:
    return {
        "id": str(i),
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
    }


@pytest.mark.asyncio
async def test_cloud_proxy_refuses_its_shares_as_the_endpoint_does(
    http_target: HttpTarget, cloud: tuple[CloudFaultProxy, str]
) -> None:
    proxy, url = cloud
    proxy.set(share_429=0.3, share_503=0.2)
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        for i in range(300):
            async with session.post(
                f"{url}/v2/models/pump/infer?trace=1",
                json=infer_body(i),
                headers={"Authorization": "Basic ZGV2OnRva2Vu"},
            ) as answer:
                statuses.append(answer.status)
                body = await answer.json()
                if answer.status == 429:
                    assert set(body) == {"error", "retry_after_s", "reason"}
                    assert body["reason"] == "capacity" and body["retry_after_s"] > 0
                    assert int(answer.headers["Retry-After"]) >= 1
                elif answer.status == 503:
                    assert "error" in body and answer.headers["Retry-After"]
                else:
                    assert answer.status == 200
                    assert body["id"] == str(i) and answer.headers["X-Served-By"] == "target"
    stats = proxy.stats()
    assert stats["refused_429"] == statuses.count(429)
    assert stats["refused_503"] == statuses.count(503)
    assert stats["forwarded"] == statuses.count(200) == len(http_target.requests)
    assert 0.2 < stats["refused_429"] / 300 < 0.4
    assert 0.1 < stats["refused_503"] / 300 < 0.3
    name, query, headers = http_target.requests[0]
    assert (name, query, headers["Authorization"]) == ("pump", "trace=1", "Basic ZGV2OnRva2Vu")


@pytest.mark.asyncio
async def test_cloud_proxy_forwards_slow_requests_late(
    http_target: HttpTarget, cloud: tuple[CloudFaultProxy, str]
) -> None:
    proxy, url = cloud
    proxy.set(slow_ms=200)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(f"{url}/v2/models/pump/infer", json=infer_body(1)) as answer:
            assert answer.status == 200
            assert json.loads(await answer.read())["id"] == "1"
        assert time.monotonic() - started >= 0.2
        proxy.set()
        async with session.post(f"{url}/v2/models/pump/infer", json=infer_body(2)) as answer:
            assert answer.status == 200
    assert proxy.stats() == {
        "forwarded": 2,
        "refused_429": 0,
        "refused_503": 0,
        "slowed": 1,
        "failed": 0,
    }


# --- bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "named"),
    [
        ({"latency_ms": -1}, "latency_ms"),
        ({"jitter_ms": float("nan")}, "jitter_ms"),
        ({"loss": 1.0}, "loss"),
        ({"loss": -0.1}, "loss"),
        ({"bandwidth_kbps": 0}, "bandwidth_kbps"),
        ({"bandwidth_kbps": float("inf")}, "bandwidth_kbps"),
        ({"down": "yes"}, "down"),
    ],
)
def test_bad_link_faults_are_refused_by_name(faults: dict[str, Any], named: str) -> None:
    with pytest.raises(ProxyError, match=named):
        LinkFaults(**faults)


@pytest.mark.asyncio
async def test_bad_groups_and_targets_are_refused_by_name(broker_proxy: FaultProxy) -> None:
    await broker_proxy.open("known")
    with pytest.raises(ProxyError, match="'known' is already open"):
        await broker_proxy.open("known")
    with pytest.raises(ProxyError, match=r"no group 'other'.*open: known"):
        broker_proxy.set("other", LinkFaults())
    with pytest.raises(ProxyError, match="no group 'other'"):
        broker_proxy.cut("other")
    with pytest.raises(ProxyError, match="faults must be a LinkFaults"):
        broker_proxy.set("known", {"down": True})  # type: ignore[arg-type]
    with pytest.raises(ProxyError, match="non-empty string"):
        await broker_proxy.open("")
    with pytest.raises(ProxyError, match="target_port"):
        FaultProxy("127.0.0.1", 70000)
    with pytest.raises(ProxyError, match="target_url"):
        CloudFaultProxy("127.0.0.1:8080")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"share_429": 1.5}, "share_429"),
        ({"share_503": -0.1}, "share_503"),
        ({"share_429": 0.6, "share_503": 0.6}, "share_429 \\+ share_503"),
        ({"slow_ms": -5}, "slow_ms"),
    ],
)
def test_bad_cloud_faults_are_refused_by_name(settings: dict[str, float], named: str) -> None:
    proxy = CloudFaultProxy("http://127.0.0.1:9")
    with pytest.raises(ProxyError, match=named):
        proxy.set(**settings)
    assert proxy.stats()["forwarded"] == 0


class _AlwaysLost:
    """A draw that loses every chunk: the retransmission model's worst case."""

    def random(self) -> float:
        return 0.0


def test_a_chunk_lost_past_the_retries_gives_up_after_linux_s_backoff() -> None:
    from simulator.proxy import RETRIES_MAX, RTO_MAX_S, RTO_MIN_S, _Direction

    lost, extra, given_up = _Direction._retransmission_delay(0.5, _AlwaysLost())  # type: ignore[arg-type]
    backoff = [min(RTO_MIN_S * 2**k, RTO_MAX_S) for k in range(RETRIES_MAX + 1)]
    assert (lost, given_up) == (RETRIES_MAX + 1, True)
    assert extra == pytest.approx(sum(backoff)) == pytest.approx(924.6)
