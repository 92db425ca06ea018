"""The local inference API's HTTP server: the Open Inference Protocol on localhost.

What each route answers is in :mod:`agent.api.routes`; what the API admits,
in :mod:`agent.api.admission`. This module serves connections: HTTP/1.1 with
keep-alive and pipelining, one asyncio task per connection over a transport
whose bytes llhttp parses (:mod:`agent.api.connection`): no web framework, to
keep the device process small (aiohttp alone would cost ~17 MB of a 64 MB
budget). Reading stops while a request waits for admission: its body stays
in the kernel's socket buffer until it is admitted. A connection beyond
``max_connections`` is answered on the bare socket, without reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine
from functools import lru_cache
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from agent.api.admission import Admission, ApiLimits
from agent.api.charges import Charge, RequestCharges
from agent.api.connection import (
    BODY_READ,
    LINGER_READ_S,
    LINGER_TOTAL_S,
    HttpConnection,
    Malformed,
    Request,
)
from agent.api.inprocess import ChainProvider
from agent.api.responses import Response, error_response, raw_busy_response
from agent.api.routes import InferenceRoutes

if TYPE_CHECKING:
    from agent.metrics import AgentMetrics

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 16 * 1024
# Connections beyond max_connections answered 503 at a time; more wait,
# unaccepted, in the kernel's listen queue (they cost the process nothing there).
_MAX_TURNING_AWAY = 256
_LISTEN_BACKLOG = 1024
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class LocalApi:
    """Serves the fallback chain over HTTP until closed, within ``limits``.

    ``chain`` is the chain, or a callable returning the chain to use for each
    request. Use as ``async with LocalApi(...) as api:``, or run
    ``api.serve_forever()`` as a task of a ``TaskGroup`` (cancel it to stop).
    ``port=0`` picks a free port; :attr:`port` tells which. :attr:`admission`
    holds the counts of connections, bytes in flight and refusals; ``metrics``,
    the agent's own, served with them at ``/metrics`` (requests the API refuses
    before they reach the chain are counted there).
    """

    def __init__(
        self,
        chain: ChainProvider,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        limits: ApiLimits | None = None,
        idle_timeout_s: float = 60.0,
        read_timeout_s: float = 10.0,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.limits = limits or ApiLimits()
        self.admission = Admission(self.limits)
        self._charges = RequestCharges(self.admission)
        self._routes = InferenceRoutes(chain, self.admission.metrics, metrics)
        self.idle_timeout_s = idle_timeout_s
        self.read_timeout_s = read_timeout_s
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._turning_away = asyncio.Semaphore(_MAX_TURNING_AWAY)
        self._discard = bytearray(BODY_READ)  # shared: what is read into it is never looked at
        # Shared by every connection: each read is parsed as soon as it is made.
        self._read_buffer = memoryview(bytearray(BODY_READ))
        self._busy = raw_busy_response(
            f"the local API serves {self.limits.max_connections} connections at a time and all "
            f"are busy; retry after {self.limits.retry_after_s} s",
            self.limits.retry_after_s,
        )
        self._closing = False

    @property
    def port(self) -> int:
        """The port served on (the one picked when constructed with ``port=0``)."""
        if self._listener is not None:
            return int(self._listener.getsockname()[1])
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen; returns once the socket is bound."""
        if self._listener is not None:
            return
        numeric = _numeric_address(self.host, self._port)
        if numeric is not None:  # no resolver thread for an address given as digits
            family, address = numeric
        else:
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(
                self.host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, address = infos[0]
        listener = socket.create_server(address, family=family, backlog=_LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept(listener))

    async def close(self) -> None:
        """Stop listening and close every open connection."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._closing = True
        try:
            if self._accepting is not None:
                self._accepting.cancel()
                await asyncio.gather(self._accepting, return_exceptions=True)
                self._accepting = None
            listener.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
        finally:
            self._closing = False

    async def serve_forever(self) -> None:
        """Serve until cancelled, then close."""
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- connections ---------------------------------------------------------

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # Out of file descriptors, most likely: what waits stays queued in the kernel.
                logger.warning("the local API cannot accept a connection now: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # each response is one write: send it at once
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.admission.open_connection():
                self._track(self._connection(sock))
            else:
                await self._turning_away.acquire()
                self._track(self._turn_away(sock))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _turn_away(self, sock: socket.socket) -> None:
        """Answer 503 without reading the request: every connection slot is taken."""
        try:
            await self._write(sock, self._busy)
            await self._linger(sock)
        except (OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            if not self._closing:
                raise
        finally:
            sock.close()
            self._turning_away.release()

    async def _linger(self, sock: socket.socket) -> None:
        """Half-close, then read and drop what the client still sends, for a bounded time."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, TimeoutError):
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(LINGER_TOTAL_S):
                while True:
                    async with asyncio.timeout(LINGER_READ_S):
                        if await loop.sock_recv_into(sock, self._discard) == 0:
                            return

    async def _connection(self, sock: socket.socket) -> None:
        conn = HttpConnection(self._read_buffer, _MAX_HEADER_BYTES)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)
            while await self._exchange(conn):
                pass
        except (ConnectionError, TimeoutError):
            return
        except asyncio.CancelledError:
            # close() cancels open connections; ending quietly keeps asyncio from
            # reporting the cancellation as an error of the connection's task.
            if not self._closing:
                raise
        except Exception:
            logger.exception("the local API failed on a connection")
        finally:
            if conn.transport is None:
                sock.close()
            conn.close()
            self.admission.close_connection()

    async def _exchange(self, conn: HttpConnection) -> bool:
        """Serve one request; whether the connection stays open for the next."""
        try:
            request = await conn.next_request(self.idle_timeout_s)
        except TimeoutError:
            return False
        if request is None:
            return False
        if isinstance(request, Malformed):
            await self._send(conn, error_response(request.status, request.message, close=True))
            await conn.linger()
            return False
        charge = Charge()
        try:
            refused = await self._admit(conn, request, charge)
            if refused is not None:
                response = refused
            else:
                body = (
                    request.body  # came whole with its head
                    if request.complete and not request.chunked
                    else await self._read_body(conn, request, charge)
                )
                response = (
                    body
                    if isinstance(body, Response)
                    else await self._routes.dispatch(
                        request, body, lambda b: self._charges.charge_parse(charge, b)
                    )
                )
            keep = request.keep_alive and request.complete and not response.close
            await self._send(conn, response, head=request.method == b"HEAD", close=not keep)
        finally:
            self._charges.release(charge)
        if not keep:
            await conn.linger()
        return keep

    async def _admit(
        self, conn: HttpConnection, request: Request, charge: Charge
    ) -> Response | None:
        """Charge ``request``'s body to ``charge`` (nothing without one); the refusal to send."""
        length, chunked = request.content_length, request.chunked
        charges = self._charges
        refused = charges.admit_now(charge, length, chunked=chunked)
        if refused is False:  # no room now: wait for it
            refused = await charges.admit(charge, length, chunked=chunked)
        if refused is not None:
            return refused
        if (chunked or length) and request.expect_continue and not request.body:
            conn.write(_CONTINUE)
        return None

    async def _read_body(
        self, conn: HttpConnection, request: Request, charge: Charge
    ) -> bytearray | Response:
        """The request's body, or a response to send instead.

        The whole body must arrive within ``body_timeout_s`` (each read within
        ``read_timeout_s``); a chunked body's charge grows with it.
        """
        body = request.body
        if request.complete and not request.chunked:  # came whole with its head
            return body
        limits = self.limits
        seen = 0
        conn.reading_body(True)
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                while True:
                    if len(body) > seen:
                        seen = len(body)
                        if not self.admission.body_allowed(seen):
                            return self._charges.too_large()
                        # What has come is charged before more is read (at most one read
                        # of BODY_READ is in memory uncharged).
                        if request.chunked and (refused := await self._charges.grow(charge, seen)):
                            return refused
                    if request.complete:
                        return body
                    if conn.broken:  # the parser refused the rest of the body
                        refusal = conn.requests.pop()
                        assert isinstance(refusal, Malformed)
                        return error_response(refusal.status, refusal.message, close=True)
                    if conn.at_eof:
                        whole = (
                            "a chunked body"
                            if request.chunked
                            else f"a body of {request.content_length} bytes"
                        )
                        return error_response(
                            400,
                            f"malformed HTTP request: the client stopped sending after "
                            f"{seen} bytes of {whole}",
                            close=True,
                        )
                    await conn.wait(self.read_timeout_s)
        except TimeoutError:
            self.admission.refuse("body_timeout")
            return error_response(
                408,
                "the request body did not arrive in time: a body must arrive within "
                f"{limits.body_timeout_s:g} s, with no pause over {self.read_timeout_s:g} s; "
                f"{len(body)} bytes came",
                close=True,
            )
        finally:
            conn.reading_body(False)

    async def _write(self, sock: socket.socket, data: bytes) -> None:
        try:  # a response that fits the socket's send buffer goes in one send(), no timer
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            async with asyncio.timeout(self.read_timeout_s):
                await asyncio.get_running_loop().sock_sendall(sock, memoryview(data)[sent:])

    async def _send(
        self, conn: HttpConnection, response: Response, *, head: bool = False, close: bool = True
    ) -> None:
        """Write ``response`` whole, in one write; ``close``: the connection ends after it."""
        body = response.body
        lines = [_status_head(response.status, response.content_type), b"%d\r\n" % len(body)]
        for name, value in response.headers:
            lines.append(f"{name}: {value}\r\n".encode())
        if close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        if not head:
            lines.append(body)
        conn.write(b"".join(lines))
        await conn.drain(self.read_timeout_s)


@lru_cache(maxsize=64)
def _status_head(status: int, content_type: str) -> bytes:
    """A response's status line and headers up to its Content-Length's value."""
    reason = _REASONS.get(status) or HTTPStatus(status).phrase.encode()
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: " % (
        status,
        reason,
        content_type.encode(),
    )


def _numeric_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]] | None:
    """``host`` as an IPv4 or IPv6 address in digits, with its family; ``None`` for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return family, ((host, port) if family == socket.AF_INET else (host, port, 0, 0))
    return None
