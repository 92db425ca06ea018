"""One connection of the local API: HTTP/1.1 parsed by llhttp (httptools) off an asyncio transport.

The transport reads into a buffer this module hands it (an
:class:`asyncio.BufferedProtocol`): 4 KB at a time while a request head is
awaited, 64 KB while an admitted body is read. Reading stops whenever the
connection's task is not waiting for bytes, so a request's body beyond the
read that brought its head stays in the kernel's socket buffer until the
request is admitted, and at most one read is in the process uncharged.
Requests that came pipelined in one read are parsed and queued, in order.

What llhttp refuses (a malformed request line or header, conflicting
lengths, a transfer coding other than chunked) is queued as a
:class:`Malformed` request after the requests parsed before it; nothing of
the connection is parsed after it. A head over ``max_head_bytes`` is refused
the same way (431); its bytes are counted as they arrive, whole reads at a
time once a head spans reads, and header by header within the read that
began it: the limit holds to within one read (4 KB while a head is awaited).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Final

import httptools

HEAD_READ: Final = 4096
BODY_READ: Final = 65536
# A connection closed with unread data in its receive buffer is reset, and a
# reset can destroy the response just sent: before closing, what the client
# still sends is read and thrown away (a "lingering close"), for a bounded time.
LINGER_READ_S: Final = 5.0  # a client on a busy device may pause between writes
LINGER_TOTAL_S: Final = 10.0


class Request:
    """A request head as llhttp parsed it, and its body as it arrives.

    ``method``, ``target`` and ``headers`` are what the routes read; llhttp
    made the checks. ``headers`` are ``(lower-case name, value)`` pairs.
    ``complete`` once the whole body has come.
    """

    __slots__ = (
        "binary_data",
        "body",
        "chunked",
        "complete",
        "content_length",
        "expect_continue",
        "has_host",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "target",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        http_version: bytes,
        *,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.complete = False
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.has_host = False
        self.binary_data = False  # the binary tensor data extension's header came
        for name, value in headers:
            if name == b"host":
                self.has_host = True
            elif name == b"content-length":
                self.content_length = int(value)  # llhttp checked it is a number, and one
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"expect":
                self.expect_continue = value.lower() == b"100-continue"
            elif name == b"inference-header-content-length":
                self.binary_data = True


class Malformed:
    """What the parser refused: the status and message the refusal is sent with."""

    __slots__ = ("message", "status")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def _refusal(exc: httptools.HttpParserError) -> Malformed:
    text = str(exc) or type(exc).__name__
    if "invalid `Transfer-Encoding`" in text:
        return Malformed(501, f"malformed HTTP request: {text}; only chunked is supported")
    if "HTTP version" in text:
        return Malformed(505, f"malformed HTTP request: {text}; this API speaks HTTP/1.1")
    return Malformed(400, f"malformed HTTP request: {text}")


class HttpConnection(asyncio.BufferedProtocol):
    """The bytes of one connection, parsed into :attr:`requests`; the task serving it waits here.

    ``buffer`` is read into and parsed at once (it may be shared by every
    connection of a loop). The serving task takes requests with
    :meth:`next_request`, waits for more of a body with :meth:`wait`, writes
    with :meth:`write` and :meth:`drain`, and ends with :meth:`linger` and
    :meth:`close`.
    """

    def __init__(self, buffer: memoryview, max_head_bytes: int) -> None:
        self._buffer = buffer
        self._max_head_bytes = max_head_bytes
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.requests: deque[Request | Malformed] = deque()
        self._read_size = HEAD_READ
        # The head being parsed: its target, headers and size so far.
        self._in_head = False
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._counting_reads = False
        self._parsing: Request | None = None  # the request whose body is being parsed
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self.at_eof = False  # the client sends no more
        self.lost = False
        self.broken = False  # a refusal ended the parsing: nothing more is parsed
        self._discarding = False

    # -- the transport's side ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Writing "pauses" whenever anything is left unsent, so drain() waits for all of it.
        transport.set_write_buffer_limits(high=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer[: self._read_size]

    def buffer_updated(self, nbytes: int) -> None:
        if not (self._discarding or self.broken):
            self._parse(nbytes)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        else:  # nobody waits for bytes now: leave the next ones in the kernel
            self._pause_reading()

    def _parse(self, nbytes: int) -> None:
        spans = self._in_head
        data = self._buffer[:nbytes]
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # A request to switch protocols is served as any other (no switch is made),
                # and what came after it parsed as the next request.
                data = data[upgrade.args[0] :]
                continue
            except httptools.HttpParserError as exc:
                if not self.broken:  # else a callback refused the head, and said why
                    self._refuse(_refusal(exc))
                return
            break
        if self._in_head and spans:  # the whole read was part of one head
            self._head_bytes += nbytes
            if self._head_bytes > self._max_head_bytes:
                self._refuse(self._head_too_large())
        # From here on a head's size is counted in whole reads.
        self._counting_reads = self._in_head

    def _refuse(self, refusal: Malformed) -> None:
        self.requests.append(refusal)
        self.broken = True
        self._in_head = False
        if self._parsing is not None:
            self._parsing = None

    def _head_too_large(self) -> Malformed:
        return Malformed(
            431,
            "malformed HTTP request: the request line and headers are over "
            f"{self._max_head_bytes} bytes",
        )

    def _count_head(self, size: int) -> None:
        """Count ``size`` bytes of the head in the read that began it; refuse it when over."""
        self._head_bytes += size
        if self._head_bytes > self._max_head_bytes:
            self._refuse(self._head_too_large())
            raise _HeadRefused

    def eof_received(self) -> bool:
        self.at_eof = True
        self._wake()
        return True  # half-closed: the answers to what came are still sent

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.at_eof = True
        self._wake()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- llhttp's callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._target = b""
        self._headers = []
        self._head_bytes = 0
        self._counting_reads = False

    def on_url(self, url: bytes) -> None:
        self._target += url
        if not self._counting_reads:
            self._head_bytes += len(url)
            if self._head_bytes > self._max_head_bytes:
                self._count_head(0)  # refuses the head

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        if not self._counting_reads:
            # _count_head's sum, without a call per header while the head is within its limit.
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > self._max_head_bytes:
                self._count_head(0)  # refuses the head

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        request = Request(
            parser.get_method(),
            self._target,
            self._headers,
            version.encode(),
            # HTTP/1.0 connections are not kept alive, whatever they ask.
            keep_alive=version == "1.1" and parser.should_keep_alive(),
        )
        self._in_head = False
        if version == "1.1" and not request.has_host:
            self._refuse(Malformed(400, "malformed HTTP request: Missing mandatory Host: header"))
            raise _HeadRefused
        if parser.should_upgrade() and (request.content_length or request.chunked):
            # llhttp hands what follows such a head back unparsed, as the new protocol's: a
            # body there would be read as the next request. No switch is made, so refuse it.
            self._refuse(
                Malformed(
                    400,
                    "malformed HTTP request: a request to switch protocols (Upgrade or "
                    "CONNECT) cannot carry a body here",
                )
            )
            raise _HeadRefused
        self._parsing = request
        self.requests.append(request)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.body += body

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.complete = True
            self._parsing = None

    # -- the serving task's side ---------------------------------------------

    async def next_request(self, timeout_s: float) -> Request | Malformed | None:
        """The next request, once its head has come; ``None`` when the client is done.

        Raises :class:`TimeoutError` when no head comes within ``timeout_s``
        of a read.
        """
        self._read_size = HEAD_READ
        while not self.requests:
            if self.at_eof or self.broken:
                return None
            await self.wait(timeout_s)
        request = self.requests.popleft()
        if isinstance(request, Request) and not request.complete:
            # Its body waits in the kernel until the request is admitted and reads it.
            self._pause_reading()
        return request

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def reading_body(self, reading: bool) -> None:
        """Read in large pieces (an admitted body is read) or small ones (a head is awaited)."""
        self._read_size = BODY_READ if reading else HEAD_READ

    async def wait(self, timeout_s: float) -> None:
        """Read until more bytes come; :class:`TimeoutError` after ``timeout_s`` without."""
        if self.lost:
            raise ConnectionResetError("the client closed the connection")
        waiter = self._waiter = self._loop.create_future()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        # One timer per connection, moved only when a wait must end sooner than it fires:
        # most waits end long before their deadline, and cost no timer of their own.
        deadline = self._deadline = self._loop.time() + timeout_s
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # the next wait sets a timer of its own
        if self._loop.time() >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def write(self, data: bytes) -> None:
        """Send ``data`` (one ``send()`` when the socket takes it whole)."""
        if self.transport is None or self.lost:
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    async def drain(self, timeout_s: float) -> None:
        """Wait until all that was written is sent; :class:`TimeoutError` after ``timeout_s``."""
        if not self._writing_paused:
            return
        if self.lost:
            raise ConnectionResetError("the client closed the connection")
        drained = self._drained = self._loop.create_future()
        timer = self._loop.call_later(timeout_s, _expire, drained)
        try:
            await drained
        finally:
            timer.cancel()
            self._drained = None

    async def linger(self) -> None:
        """Half-close, then read and drop what the client still sends, for a bounded time."""
        self._discarding = True
        self.requests.clear()
        self._read_size = BODY_READ
        transport = self.transport
        if transport is None or self.lost:
            return
        with contextlib.suppress(OSError, TimeoutError):
            if transport.can_write_eof():
                transport.write_eof()
            async with asyncio.timeout(LINGER_TOTAL_S):
                while not self.at_eof:
                    await self.wait(LINGER_READ_S)

    def close(self) -> None:
        """Close the connection; what is still unsent is dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is None:
            return
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()


class _HeadRefused(Exception):
    """Stops llhttp at a head this module refused (the refusal is queued already)."""


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
