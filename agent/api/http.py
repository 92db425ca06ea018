"""The local inference API's HTTP server: the Open Inference Protocol on localhost.

What each route answers is in :mod:`agent.api.routes`; what the API admits,
in :mod:`agent.api.admission`. This module serves connections: HTTP/1.1 with
keep-alive, one asyncio task per connection, parsed by h11: no web framework,
to keep the device process small (aiohttp alone would cost ~17 MB of a 64 MB
budget). Sockets are read with explicit sizes (``sock_recv``), never by a
transport that reads ahead: a request's body stays in the kernel's socket
buffer until the request is admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import h11

from agent.api.admission import Admission, ApiLimits
from agent.api.charges import Charge, RequestCharges
from agent.api.inprocess import ChainProvider
from agent.api.responses import Response, error_response, raw_busy_response
from agent.api.routes import InferenceRoutes

if TYPE_CHECKING:
    from agent.metrics import AgentMetrics

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 16 * 1024
# A request head is read in small pieces, so that little of a body not yet
# admitted comes with it; an admitted body in larger ones.
_HEAD_READ = 4096
_BODY_READ = 65536
# A connection closed with unread data in its receive buffer is reset, and a
# reset can destroy the response just sent: before closing, what the client
# still sends is read and thrown away (a "lingering close"), for a bounded time.
_LINGER_READ_S = 5.0  # a client on a busy device may pause between writes
_LINGER_TOTAL_S = 10.0
# Connections beyond max_connections answered 503 at a time; more wait,
# unaccepted, in the kernel's listen queue (they cost the process nothing there).
_MAX_TURNING_AWAY = 256
_LISTEN_BACKLOG = 1024
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


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
        self._discard = bytearray(_BODY_READ)  # shared: what is read into it is never looked at
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
            async with asyncio.timeout(_LINGER_TOTAL_S):
                while True:
                    async with asyncio.timeout(_LINGER_READ_S):
                        if await loop.sock_recv_into(sock, self._discard) == 0:
                            return

    async def _connection(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        try:
            while True:
                if not await self._exchange(conn, sock):
                    return
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, h11.LocalProtocolError):
            return
        except asyncio.CancelledError:
            # close() cancels open connections; ending quietly keeps asyncio from
            # reporting the cancellation as an error of the connection's task.
            if not self._closing:
                raise
        except Exception:
            logger.exception("the local API failed on a connection")
        finally:
            sock.close()
            self.admission.close_connection()

    async def _exchange(self, conn: h11.Connection, sock: socket.socket) -> bool:
        """Serve one request; whether the connection stays open for the next."""
        head = False
        charge = Charge()
        try:
            try:
                try:
                    event = await self._next_event(conn, sock, self.idle_timeout_s, _HEAD_READ)
                except TimeoutError:
                    return False
                if not isinstance(event, h11.Request):
                    return False
                head = event.method == b"HEAD"
                refused = await self._admit(conn, sock, event, charge)
                if refused is not None:
                    response = refused
                else:
                    body = await self._read_body(conn, sock, charge, chunked=_chunked(event))
                    if body is None:
                        return False
                    response = (
                        body
                        if isinstance(body, Response)
                        else await self._routes.dispatch(
                            event, body, lambda b: self._charges.charge_parse(charge, b)
                        )
                    )
            except h11.RemoteProtocolError as exc:
                if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                    return False
                response = error_response(
                    exc.error_status_hint, f"malformed HTTP request: {exc}", close=True
                )
            await self._send(conn, sock, response, head=head)
        finally:
            self._charges.release(charge)
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            await self._linger(sock)
            return False
        return True

    async def _admit(
        self, conn: h11.Connection, sock: socket.socket, request: h11.Request, charge: Charge
    ) -> Response | None:
        """Charge ``request``'s body to ``charge`` (nothing without one); the refusal to send."""
        length = _content_length(request)
        chunked = _chunked(request)
        if refused := await self._charges.admit(charge, length, chunked=chunked):
            return refused
        if (chunked or length) and conn.they_are_waiting_for_100_continue:
            go_on = conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            await self._write(sock, go_on)
        return None

    async def _read_body(
        self, conn: h11.Connection, sock: socket.socket, charge: Charge, *, chunked: bool
    ) -> bytearray | Response | None:
        """The request's body; a response to send instead; ``None`` to hang up.

        The whole body must arrive within ``body_timeout_s`` (each read within
        ``read_timeout_s``); a chunked body's charge grows with it.
        """
        body = bytearray()
        limits = self.limits
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                while True:
                    part = await self._next_event(conn, sock, self.read_timeout_s, _BODY_READ)
                    if isinstance(part, h11.Data):
                        body += part.data
                        if not self.admission.body_allowed(len(body)):
                            return self._charges.too_large()
                        # What has come is charged before more is read (at most one read
                        # of _BODY_READ is in memory uncharged).
                        if chunked and (refused := await self._charges.grow(charge, len(body))):
                            return refused
                    elif isinstance(part, h11.EndOfMessage):
                        return body
                    else:
                        return None
        except TimeoutError:
            self.admission.refuse("body_timeout")
            return error_response(
                408,
                "the request body did not arrive in time: a body must arrive within "
                f"{limits.body_timeout_s:g} s, with no pause over {self.read_timeout_s:g} s; "
                f"{len(body)} bytes came",
                close=True,
            )

    async def _next_event(
        self, conn: h11.Connection, sock: socket.socket, timeout_s: float, size: int
    ) -> object:
        loop = asyncio.get_running_loop()
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout_s):
                data = await loop.sock_recv(sock, size)
            conn.receive_data(data)

    async def _write(self, sock: socket.socket, data: bytes) -> None:
        try:  # a response that fits the socket's send buffer goes in one send(), no timer
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            async with asyncio.timeout(self.read_timeout_s):
                await asyncio.get_running_loop().sock_sendall(sock, memoryview(data)[sent:])

    async def _send(
        self,
        conn: h11.Connection,
        sock: socket.socket,
        response: Response,
        *,
        head: bool = False,
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        if response.close:
            headers.append(("Connection", "close"))
        reason = _REASONS.get(response.status) or HTTPStatus(response.status).phrase.encode()
        parts = [
            conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        ]
        if not head:
            parts.append(conn.send(h11.Data(data=response.body)))
        parts.append(conn.send(h11.EndOfMessage()))
        await self._write(sock, b"".join(p for p in parts if p is not None))


def _content_length(request: h11.Request) -> int | None:
    for key, value in request.headers:
        if key == b"content-length":
            return int(value)
    return None


def _chunked(request: h11.Request) -> bool:
    return any(k == b"transfer-encoding" and b"chunked" in v.lower() for k, v in request.headers)
