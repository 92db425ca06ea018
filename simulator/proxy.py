"""Network faults between simulated devices and what they talk to, injected in one process.

:class:`FaultProxy` relays TCP byte for byte between devices and one target
(the MQTT broker, or the fleet server's HTTP). Devices are partitioned into
groups when they are created; each group gets a listening port of its own on
127.0.0.1 (:meth:`FaultProxy.open`) and one set of :class:`LinkFaults`, which
:meth:`FaultProxy.set` changes at any moment, for open connections too.
:class:`CloudFaultProxy` stands in front of the cloud inference endpoint and
refuses or slows whole HTTP requests, as a capacity cut would.

The link model, per connection and per direction (device to target, "up", and
target to device, "down"); a *chunk* is what one read from the socket returned,
cut to at most :data:`CHUNK_BYTES` (and to the token bucket's depth under a
bandwidth cap), the proxy's stand-in for a TCP segment:

- ``latency_ms`` is one-way: every chunk is delivered at least that late, each
  way, so a request/answer round trip grows by twice it. ``jitter_ms`` adds a
  uniform ``[0, jitter_ms]`` on top (never below the latency set). Chunks of
  one direction are never reordered: one that would overtake the previous is
  held until it has gone, as TCP's in-order delivery holds it.
- ``loss`` is the probability that a chunk is lost on the wire. TCP loses no
  bytes, so a lost chunk arrives late instead, as its retransmission would:
  after an RTO of :data:`RTO_MIN_S` (200 ms, Linux's floor), doubling each
  time the retransmission is lost again (with the same probability), capped at
  :data:`RTO_MAX_S`. After :data:`RETRIES_MAX` lost retransmissions in a row
  the connection is reset, as Linux gives up after ``tcp_retries2`` (15).
  Everything behind a lost chunk waits for it (head-of-line blocking).
- ``bandwidth_kbps`` (kilobits per second) caps each connection each way with
  a token bucket of that rate holding :data:`BURST_S` worth of bytes (at
  least :data:`BURST_MIN_BYTES`): N bytes take at least ``(N - burst) / rate``.
  The cap applies before the latency, as a slow access link's does.
- ``down`` refuses new connections (accepted by the kernel, then reset before
  a byte passes) and resets the open ones at once, both ways.

:meth:`FaultProxy.cut` resets every open connection of a group (or all): each
device sees its connection reset and reconnects, a reconnect storm.

Changes apply at once: ``down`` resets what is open, and the other faults
apply to every chunk read after the change (chunks already queued keep the time
they were given). Chunks are held in a queue per direction with one timer for
its head, never a task per chunk; reading from a side pauses while more than
:data:`HIGH_WATER_BYTES` wait to be delivered to the other (the read that
passed the mark still lands) or the other's socket buffer is full, so a slow
link pushes back on the sender instead of growing memory without bound.
There is no task per connection either: both sides are asyncio protocols, and
only connecting to the target is a short-lived task.

Jitter and loss are drawn from a generator seeded per group (the proxy's
``seed`` and the group's name); how the bytes fall into chunks depends on
timing, so two runs are alike rather than identical.

Use::

    proxy = FaultProxy("127.0.0.1", 1883, seed=7, name="broker")
    port = await proxy.open("cohort-a")      # devices of cohort-a connect to 127.0.0.1:port
    proxy.set("cohort-a", LinkFaults(latency_ms=80, jitter_ms=20, loss=0.01))
    proxy.cut("cohort-a")                    # a reconnect storm
    proxy.set("cohort-a", LinkFaults(down=True))
    proxy.set("cohort-a", LinkFaults())      # healed
    await proxy.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import struct
from collections import deque
from dataclasses import dataclass, replace

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

__all__ = [
    "CloudFaultProxy",
    "FaultProxy",
    "GroupStats",
    "LinkFaults",
    "ProxyError",
]

HOST = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
HIGH_WATER_BYTES = 256 * 1024
LOW_WATER_BYTES = 64 * 1024
RTO_MIN_S = 0.2
RTO_MAX_S = 120.0
RETRIES_MAX = 15
BURST_S = 0.05
BURST_MIN_BYTES = 4096
CONNECT_TIMEOUT_S = 10.0
# An abortive close: the peer sees a reset (RST), not an orderly end of stream.
_LINGER_RESET = struct.pack("ii", 1, 0)


class ProxyError(ValueError):
    """A fault or a group the proxy refuses; the message names what was wrong."""


@dataclass(frozen=True)
class LinkFaults:
    """The faults on a group's link; all off by default (a plain relay).

    ``latency_ms`` and ``jitter_ms`` are one-way, per direction; ``loss`` a
    probability in ``[0, 1)`` (a link losing everything is ``down``);
    ``bandwidth_kbps`` kilobits per second per connection each way, or None
    for no cap. See the module docstring for the model.
    """

    down: bool = False
    latency_ms: float = 0
    jitter_ms: float = 0
    loss: float = 0
    bandwidth_kbps: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.down, bool):
            raise ProxyError(f"down must be true or false, not {self.down!r}")
        for name in ("latency_ms", "jitter_ms"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ProxyError(f"{name} must be a finite number >= 0, not {value!r}")
        if not _finite(self.loss) or not 0 <= self.loss < 1:
            raise ProxyError(
                f"loss must be a probability in [0, 1), not {self.loss!r} "
                "(a link that loses everything is down=True)"
            )
        kbps = self.bandwidth_kbps
        if kbps is not None and (not _finite(kbps) or kbps <= 0):
            raise ProxyError(f"bandwidth_kbps must be a number > 0 or None, not {kbps!r}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GroupStats:
    """What crossed one group's link (a snapshot when read from :meth:`FaultProxy.stats`).

    ``opened`` counts connections relayed to the target, ``open`` those open
    now, ``cut`` those reset by :meth:`FaultProxy.cut` or by ``down``,
    ``refused`` those turned away while the link was down, ``target_failed``
    those whose target could not be reached. ``bytes_up`` went from devices to
    the target in ``chunks_up`` writes, ``bytes_down`` back in ``chunks_down``;
    ``retransmits`` counts chunk losses made up for by a late delivery, and
    ``retransmit_resets`` connections reset because a chunk was lost more than
    :data:`RETRIES_MAX` times in a row; ``bytes_dropped`` were queued on a
    connection when it was reset, as a reset throws away what is in flight.
    ``bytes_in_flight`` is what the proxy holds, read but not yet delivered,
    at the moment of the snapshot.
    """

    opened: int = 0
    open: int = 0
    cut: int = 0
    refused: int = 0
    target_failed: int = 0
    retransmit_resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    chunks_up: int = 0
    chunks_down: int = 0
    retransmits: int = 0
    bytes_dropped: int = 0
    bytes_in_flight: int = 0


class _Group:
    """One group's listening port, faults, open connections and counts."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.faults = LinkFaults()
        self.stats = GroupStats()
        self.links: set[_Link] = set()
        self.server: asyncio.base_events.Server | None = None
        self.rng = random.Random(f"{seed}:{name}")


def _burst_bytes(bandwidth_kbps: float) -> float:
    """The token bucket's depth: :data:`BURST_S` worth, at least :data:`BURST_MIN_BYTES`."""
    return max(BURST_MIN_BYTES, bandwidth_kbps * 1000 / 8 * BURST_S)


def _reset(transport: asyncio.Transport | None) -> None:
    """Close ``transport`` abortively: the peer sees a reset, nothing queued is sent."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Direction:
    """Chunks on their way from one side to the other, held until their delivery time."""

    def __init__(self, link: _Link, upward: bool) -> None:
        self.link = link
        self.upward = upward
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued_bytes = 0
        self.last_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.tokens = 0.0
        self.tokens_at = -1.0
        self.eof = False
        self.finished = False
        self.destination_paused = False

    @property
    def source(self) -> asyncio.Transport | None:
        return self.link.device if self.upward else self.link.target

    @property
    def destination(self) -> asyncio.Transport | None:
        return self.link.target if self.upward else self.link.device

    def push(self, data: bytes) -> None:
        """Take a chunk read from the source and schedule its delivery.

        A large read goes as pieces of :data:`CHUNK_BYTES`, under a bandwidth
        cap of the bucket's depth, so the far side receives a steady trickle,
        as from a slow link, rather than the whole read at once when its last
        byte is paid for.
        """
        faults = self.link.group.faults
        piece = CHUNK_BYTES
        if faults.bandwidth_kbps is not None:
            piece = min(piece, int(_burst_bytes(faults.bandwidth_kbps)))
        if len(data) <= piece:
            self._push(data, faults)
            return
        view = memoryview(data)
        for start in range(0, len(data), piece):
            self._push(bytes(view[start : start + piece]), faults)

    def _push(self, data: bytes, faults: LinkFaults) -> None:
        group = self.link.group
        loop = self.link.loop
        now = loop.time()
        due = now + self._bandwidth_wait(len(data), faults, now)
        due += faults.latency_ms / 1000
        if faults.jitter_ms:
            due += group.rng.uniform(0, faults.jitter_ms) / 1000
        payload: bytes | None = data
        if faults.loss:
            lost, extra, given_up = self._retransmission_delay(faults.loss, group.rng)
            group.stats.retransmits += lost
            if given_up:
                payload = None  # the connection is reset at that moment instead
                group.stats.retransmit_resets += 1
            due += extra
        due = max(due, self.last_due)
        self.last_due = due
        if not self.queue and due <= now and payload is not None:
            self._write(payload)
            return
        self.queue.append((due, payload))
        self.queued_bytes += len(data)
        if self.timer is None:
            self.timer = loop.call_at(due, self.deliver)
        self._pace_source()

    def _bandwidth_wait(self, size: int, faults: LinkFaults, now: float) -> float:
        """Seconds this chunk waits for the token bucket (0 without a cap)."""
        if faults.bandwidth_kbps is None:
            self.tokens_at = -1.0
            return 0.0
        rate = faults.bandwidth_kbps * 1000 / 8  # bytes per second
        burst = _burst_bytes(faults.bandwidth_kbps)
        if self.tokens_at < 0:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + (now - self.tokens_at) * rate)
        self.tokens_at = now
        self.tokens -= size
        return 0.0 if self.tokens >= 0 else -self.tokens / rate

    @staticmethod
    def _retransmission_delay(loss: float, rng: random.Random) -> tuple[int, float, bool]:
        """Times the chunk was lost, the delay that added, and whether the sender gave up."""
        lost = 0
        extra = 0.0
        rto = RTO_MIN_S
        while rng.random() < loss:
            lost += 1
            extra += rto
            if lost > RETRIES_MAX:
                return lost, extra, True
            rto = min(rto * 2, RTO_MAX_S)
        return lost, extra, False

    def deliver(self) -> None:
        """Write every chunk that is due, then wait for the next one's time."""
        self.timer = None
        now = self.link.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, payload = self.queue.popleft()
            if payload is None:
                self.link.reset()
                return
            self.queued_bytes -= len(payload)
            self._write(payload)
        if self.queue:
            self.timer = self.link.loop.call_at(self.queue[0][0], self.deliver)
        self._pace_source()
        if not self.queue and self.eof:
            self._finish()

    def _write(self, data: bytes) -> None:
        destination = self.destination
        if destination is None or destination.is_closing():
            return
        destination.write(data)
        stats = self.link.group.stats
        if self.upward:
            stats.bytes_up += len(data)
            stats.chunks_up += 1
        else:
            stats.bytes_down += len(data)
            stats.chunks_down += 1

    def _pace_source(self) -> None:
        """Pause reading the source while too much waits to be delivered; resume once drained."""
        source = self.source
        if source is None or source.is_closing():
            return
        if self.queued_bytes > HIGH_WATER_BYTES or self.destination_paused:
            if source.is_reading():
                source.pause_reading()
        elif self.queued_bytes <= LOW_WATER_BYTES and not source.is_reading():
            source.resume_reading()

    def end_of_stream(self) -> None:
        """The source will send nothing more: pass that on once what is queued is delivered."""
        self.eof = True
        if not self.queue:
            self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        destination = self.destination
        if destination is not None and not destination.is_closing():
            if destination.can_write_eof():
                destination.write_eof()
            else:
                destination.close()
        self.link.direction_finished()

    def pause_destination(self, paused: bool) -> None:
        self.destination_paused = paused
        self._pace_source()

    def discard(self) -> int:
        """Drop everything queued (the connection is going away); the bytes dropped."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        dropped = self.queued_bytes
        self.queue.clear()
        self.queued_bytes = 0
        return dropped


class _Link:
    """One device's connection relayed to the target: two sides, two directions."""

    def __init__(self, proxy: FaultProxy, group: _Group, device: asyncio.Transport) -> None:
        self.proxy = proxy
        self.group = group
        self.loop = asyncio.get_running_loop()
        self.device: asyncio.Transport | None = device
        self.target: asyncio.Transport | None = None
        self.up = _Direction(self, upward=True)
        self.down = _Direction(self, upward=False)
        self.closed = False
        self.connecting: asyncio.Task[None] | None = None

    async def connect_target(self) -> None:
        """Open the target side; until it is open the device's bytes wait in the kernel."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport, _ = await self.loop.create_connection(
                    lambda: _TargetSide(self), self.proxy.target_host, self.proxy.target_port
                )
        except (OSError, TimeoutError):
            self.connecting = None
            self.group.stats.target_failed += 1
            self.reset()
            return
        self.connecting = None
        if self.closed:  # cut or down while connecting
            _reset(transport)
            return
        self.target = transport
        self.group.stats.opened += 1
        if self.device is not None and not self.device.is_closing():
            self.device.resume_reading()

    def reset(self, *, counted_as_cut: bool = False) -> None:
        """Reset both sides at once; whatever is in flight is dropped."""
        if self.closed:
            return
        if counted_as_cut:
            self.group.stats.cut += 1
        self.group.stats.bytes_dropped += self.up.discard() + self.down.discard()
        if self.connecting is not None:
            self.connecting.cancel()
        _reset(self.device)
        _reset(self.target)
        self._closed()

    def direction_finished(self) -> None:
        if self.up.finished and self.down.finished:
            self.close()

    def close(self) -> None:
        """Close both sides in order, once both ends have said they are done."""
        if self.closed:
            return
        self.group.stats.bytes_dropped += self.up.discard() + self.down.discard()
        if self.connecting is not None:
            self.connecting.cancel()
        for transport in (self.device, self.target):
            if transport is not None and not transport.is_closing():
                transport.close()
        self._closed()

    def _closed(self) -> None:
        self.closed = True
        if self in self.group.links:
            self.group.links.discard(self)
            self.group.stats.open -= 1

    def side_lost(self, upward_source: bool, exc: Exception | None) -> None:
        """One side's socket is gone: an error resets the other side, a close ends its stream."""
        if upward_source:
            self.device = None
        else:
            self.target = None
        if self.closed:
            return
        if exc is not None:
            self.reset()
            return
        direction = self.up if upward_source else self.down
        direction.end_of_stream()
        # Nothing can be delivered to a closed socket any more.
        other = self.down if upward_source else self.up
        if not other.finished:
            other.discard()
            other.finished = True
        self.direction_finished()


class _DeviceSide(asyncio.Protocol):
    """The device's end of a relayed connection (accepted on the group's port)."""

    def __init__(self, proxy: FaultProxy, group: _Group) -> None:
        self.proxy = proxy
        self.group = group
        self.link: _Link | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.group.faults.down or self.proxy.closing:
            self.group.stats.refused += 1
            _reset(transport)
            return
        transport.pause_reading()
        link = _Link(self.proxy, self.group, transport)
        self.link = link
        self.group.links.add(link)
        self.group.stats.open += 1
        link.connecting = asyncio.get_running_loop().create_task(link.connect_target())

    def data_received(self, data: bytes) -> None:
        if self.link is not None and not self.link.closed:
            self.link.up.push(data)

    def eof_received(self) -> bool:
        if self.link is not None and not self.link.closed:
            self.link.up.end_of_stream()
        return True  # keep the other half open: the answer may still be on its way

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.side_lost(True, exc)

    def pause_writing(self) -> None:
        if self.link is not None:
            self.link.down.pause_destination(True)

    def resume_writing(self) -> None:
        if self.link is not None:
            self.link.down.pause_destination(False)


class _TargetSide(asyncio.Protocol):
    """The target's end of a relayed connection."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def data_received(self, data: bytes) -> None:
        if not self.link.closed:
            self.link.down.push(data)

    def eof_received(self) -> bool:
        if not self.link.closed:
            self.link.down.end_of_stream()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.side_lost(False, exc)

    def pause_writing(self) -> None:
        self.link.up.pause_destination(True)

    def resume_writing(self) -> None:
        self.link.up.pause_destination(False)


class FaultProxy:
    """A TCP relay with faults per group, between devices and one target (broker or server HTTP).

    Every group listens on a port of its own (:meth:`open`); devices of a
    group connect there instead of to the target. All connections live in the
    one event loop that opened the groups, and the methods are called from it
    (a runner on another thread hands them over with ``call_soon_threadsafe``).
    """

    def __init__(
        self, target_host: str, target_port: int, *, seed: int = 0, name: str = ""
    ) -> None:
        if not target_host:
            raise ProxyError("target_host must not be empty")
        if not isinstance(target_port, int) or not 0 < target_port < 65536:
            raise ProxyError(f"target_port must be a TCP port in 1..65535, not {target_port!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.seed = seed
        self.name = name or f"{target_host}:{target_port}"
        self.closing = False
        self._groups: dict[str, _Group] = {}

    def __repr__(self) -> str:
        return f"FaultProxy({self.name!r}, groups={sorted(self._groups)})"

    async def open(self, group: str) -> int:
        """Start listening for ``group`` on a free port of 127.0.0.1 and return the port."""
        if not isinstance(group, str) or not group:
            raise ProxyError(f"a group is named by a non-empty string, not {group!r}")
        if group in self._groups:
            raise ProxyError(f"group {group!r} is already open on port {self.port(group)}")
        if self.closing:
            raise ProxyError(f"the proxy {self.name!r} is closed")
        state = _Group(group, self.seed)
        loop = asyncio.get_running_loop()
        state.server = await loop.create_server(
            lambda: _DeviceSide(self, state), HOST, 0, backlog=4096, reuse_address=True
        )
        self._groups[group] = state
        return self.port(group)

    def port(self, group: str) -> int:
        """The port ``group`` listens on."""
        server = self._group(group).server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])

    def set(self, group: str, faults: LinkFaults) -> None:
        """Put ``faults`` on ``group``'s link; open connections feel them at once."""
        if not isinstance(faults, LinkFaults):
            raise ProxyError(f"faults must be a LinkFaults, not {type(faults).__name__}")
        state = self._group(group)
        state.faults = faults
        if faults.down:
            self._cut(state)

    def faults(self, group: str) -> LinkFaults:
        """The faults on ``group``'s link now."""
        return self._group(group).faults

    def cut(self, group: str | None = None) -> int:
        """Reset every open connection of ``group`` (all groups when None); how many were reset."""
        groups = list(self._groups.values()) if group is None else [self._group(group)]
        return sum(self._cut(state) for state in groups)

    def stats(self) -> dict[str, GroupStats]:
        """Counts per group, copied: later traffic does not change what was returned."""
        return {
            name: replace(
                state.stats,
                bytes_in_flight=sum(
                    link.up.queued_bytes + link.down.queued_bytes for link in state.links
                ),
            )
            for name, state in self._groups.items()
        }

    async def close(self) -> None:
        """Stop listening and reset every open connection; the proxy cannot be reopened."""
        self.closing = True
        connecting: list[asyncio.Task[None]] = []
        for state in self._groups.values():
            if state.server is not None:
                state.server.close()
            for link in list(state.links):
                if link.connecting is not None:
                    connecting.append(link.connecting)
                link.reset()
        await asyncio.gather(*connecting, return_exceptions=True)
        for state in self._groups.values():
            if state.server is not None:
                await state.server.wait_closed()
        # Let the transports' connection_lost callbacks run, so no socket outlives close().
        await asyncio.sleep(0)

    def _cut(self, state: _Group) -> int:
        links = list(state.links)
        for link in links:
            link.reset(counted_as_cut=True)
        return len(links)

    def _group(self, group: str) -> _Group:
        try:
            return self._groups[group]
        except KeyError:
            known = ", ".join(sorted(self._groups)) or "none"
            raise ProxyError(f"no group {group!r} is open (open: {known})") from None


# --- the cloud endpoint -----------------------------------------------------------------

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself are not copied.
_NOT_FORWARDED = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Transfer-Encoding",
        "Upgrade",
        "TE",
        "Trailer",
        "Host",
        "Content-Length",
        "Content-Encoding",
    )
)
CLOUD_RETRY_AFTER_S = 1.0
CLOUD_UNAVAILABLE_RETRY_AFTER = "5"


@dataclass(frozen=True)
class _CloudFaults:
    share_429: float = 0
    share_503: float = 0
    slow_ms: float = 0


class CloudFaultProxy:
    """HTTP in front of the cloud inference endpoint: a share of requests refused, the rest late.

    A refused request never reaches the endpoint. ``share_429`` of them are
    answered ``429`` as the endpoint answers a capacity refusal (JSON
    ``{"error", "retry_after_s", "reason": "capacity"}`` and ``Retry-After``),
    ``share_503`` are answered ``503`` as an endpoint without a model is
    (``{"error"}``, ``Retry-After: 5``); the others are forwarded, ``slow_ms``
    late when set. The shares are drawn per request from a seeded generator.
    """

    def __init__(self, target_url: str, *, seed: int = 0) -> None:
        if not target_url.startswith(("http://", "https://")):
            raise ProxyError(f"target_url must be an http:// or https:// URL, not {target_url!r}")
        self.target_url = target_url.rstrip("/")
        self._rng = random.Random(seed)
        self._faults = _CloudFaults()
        self._counts = {
            "forwarded": 0,
            "refused_429": 0,
            "refused_503": 0,
            "slowed": 0,
            "failed": 0,
        }
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._url: str | None = None

    async def start(self) -> str:
        """Listen on a free port of 127.0.0.1; the URL devices use instead of the endpoint's."""
        if self._url is not None:
            return self._url
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        # No cap on connections to the endpoint: a queue here would be a delay nobody set.
        self._session = ClientSession(
            connector=TCPConnector(limit=0),
            timeout=ClientTimeout(total=None),
            auto_decompress=False,
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        listening = socket.socket()
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((HOST, 0))
        port = listening.getsockname()[1]
        await web.SockSite(self._runner, listening).start()
        self._url = f"http://{HOST}:{port}"
        return self._url

    def set(self, *, share_429: float = 0, share_503: float = 0, slow_ms: float = 0) -> None:
        """Refuse these shares of the requests (429, 503); forward the others ``slow_ms`` late."""
        for name, value in (("share_429", share_429), ("share_503", share_503)):
            if not _finite(value) or not 0 <= value <= 1:
                raise ProxyError(f"{name} must be a share in [0, 1], not {value!r}")
        if share_429 + share_503 > 1:
            raise ProxyError(
                f"share_429 + share_503 must be at most 1, not {share_429} + {share_503}"
            )
        if not _finite(slow_ms) or slow_ms < 0:
            raise ProxyError(f"slow_ms must be a finite number >= 0, not {slow_ms!r}")
        self._faults = _CloudFaults(share_429, share_503, slow_ms)

    def stats(self) -> dict[str, int]:
        """Requests forwarded, refused with 429 and 503, slowed, and failed to reach the target."""
        return dict(self._counts)

    async def close(self) -> None:
        """Stop listening and close the connections to the endpoint."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._url = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        faults = self._faults
        draw = self._rng.random()
        if draw < faults.share_429:
            self._counts["refused_429"] += 1
            return self._capacity_refusal()
        if draw < faults.share_429 + faults.share_503:
            self._counts["refused_503"] += 1
            response = web.json_response(
                {"error": "the cloud endpoint is unavailable (injected fault)"}, status=503
            )
            response.headers["Retry-After"] = CLOUD_UNAVAILABLE_RETRY_AFTER
            return response
        if faults.slow_ms > 0:
            self._counts["slowed"] += 1
            await asyncio.sleep(faults.slow_ms / 1000)
        return await self._forward(request)

    @staticmethod
    def _capacity_refusal() -> web.Response:
        response = web.json_response(
            {
                "error": "the cloud endpoint is over capacity (injected fault); retry later",
                "retry_after_s": CLOUD_RETRY_AFTER_S,
                "reason": "capacity",
            },
            status=429,
        )
        response.headers["Retry-After"] = str(max(1, math.ceil(CLOUD_RETRY_AFTER_S)))
        return response

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        body = await request.read()
        url = self.target_url + str(request.rel_url)
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            ) as answer:
                payload = await answer.read()
                kept = {k: v for k, v in answer.headers.items() if k.lower() not in _NOT_FORWARDED}
                self._counts["forwarded"] += 1
                return web.Response(status=answer.status, body=payload, headers=kept)
        except (ClientError, OSError) as exc:
            self._counts["failed"] += 1
            return web.json_response(
                {"error": f"the cloud endpoint could not be reached: {exc}"}, status=502
            )
