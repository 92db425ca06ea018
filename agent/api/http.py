"""The local inference API: the Open Inference Protocol (KServe v2) over HTTP on localhost.

Routes::

    GET  /v2                                   server metadata
    GET  /v2/health/live                       200 while the process serves
    GET  /v2/health/ready                      200 when a model, or at least the safe default,
                                               can answer; 503 and the reason otherwise
    GET  /v2/models/{name}[/versions/{v}]         model metadata from the manifest
    GET  /v2/models/{name}[/versions/{v}]/ready   200 when the model can answer
    POST /v2/models/{name}[/versions/{v}]/infer   inference through the fallback chain
    GET  /metrics                              the API's connections, bytes in flight and
                                               refusals, and the agent's own metrics
                                               (:mod:`agent.metrics`), as Prometheus text

``{name}`` is the manifest's name. Every error has a JSON body
``{"error": "..."}`` that names the tensor at fault: 400 for a body that is not
a valid protocol request, that declares a datatype other than the model's (as
Triton does: data is never converted silently) or holds a value its datatype
cannot (1e300 as FP32), 404 for an unknown route, model or version, 413 for a
body over the limit, 422 for a request that breaks the model's contract
(shape, NaN/Inf, valid range), 503 with ``Retry-After`` when the API is
at one of its limits (:mod:`agent.api.admission`). A failing stage is no
error — the chain answers — so a 500 only ever means a bug here.

HTTP/1.1 with keep-alive, one asyncio task per connection, parsed by h11: no
web framework, to keep the device process small (aiohttp alone would cost
~17 MB of a 64 MB budget). Sockets are read with explicit sizes
(``sock_recv``), never by a transport that reads ahead: a request's body
stays in the kernel's socket buffer until the request is admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import unquote, urlsplit

import h11
import numpy.typing as npt
from pydantic import BaseModel, ValidationError

import agent
from agent.api.admission import (
    MAX_JSON_DEPTH,
    Admission,
    ApiLimits,
    parse_cost,
    request_cost,
)
from agent.api.jsonscan import scan_structure
from agent.serving.chain import ChainNotReady, FallbackChain, UnknownVersion
from agent.serving.validation import InvalidInput, check_declared_shapes
from protocol.inference import (
    ErrorResponse,
    InferenceRequest,
    InferenceRequestError,
    RequestOutput,
    ServerMetadata,
    check_input_datatypes,
    check_requested_outputs,
    decode_inputs,
    describe_validation_error,
    encode_response,
    model_metadata,
    select_outputs,
)

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

ChainProvider = FallbackChain | Callable[[], FallbackChain]


@dataclass
class _Response:
    status: int
    body: bytes
    close: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


@dataclass
class _Charge:
    """The bytes charged to one request; released when its response has been sent."""

    amount: int = 0


def _json(status: int, body: BaseModel, *, close: bool = False) -> _Response:
    return _Response(status, body.model_dump_json(exclude_none=True).encode(), close)


def _error(status: int, message: str, *, close: bool = False) -> _Response:
    return _json(status, ErrorResponse(error=message), close=close)


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
        self._chain = chain
        self._metrics = metrics
        self.host = host
        self._port = port
        self.limits = limits or ApiLimits()
        self.admission = Admission(self.limits)
        self.idle_timeout_s = idle_timeout_s
        self.read_timeout_s = read_timeout_s
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._turning_away = asyncio.Semaphore(_MAX_TURNING_AWAY)
        self._budget_freed = asyncio.Event()
        self._discard = bytearray(_BODY_READ)  # shared: what is read into it is never looked at
        self._busy = _raw_response(
            503,
            f"the local API serves {self.limits.max_connections} connections at a time and all "
            f"are busy; retry after {self.limits.retry_after_s} s",
            self.limits.retry_after_s,
        )
        self._closing = False

    @property
    def max_body_bytes(self) -> int:
        return self.limits.max_body_bytes

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
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.read_timeout_s):
                await loop.sock_sendall(sock, self._busy)
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
        charge = _Charge()
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
                        if isinstance(body, _Response)
                        else (await self._dispatch(event, body, charge))
                    )
            except h11.RemoteProtocolError as exc:
                if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                    return False
                response = _error(
                    exc.error_status_hint, f"malformed HTTP request: {exc}", close=True
                )
            await self._send(conn, sock, response, head=head)
        finally:
            if charge.amount:
                self._release(charge.amount)
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            await self._linger(sock)
            return False
        return True

    async def _admit(
        self, conn: h11.Connection, sock: socket.socket, request: h11.Request, charge: _Charge
    ) -> _Response | None:
        """Charge ``request``'s body to ``charge`` (nothing without one); the refusal to send."""
        length = _content_length(request)
        if length is not None and not self.admission.body_allowed(length):
            return self._too_large()
        chunked = _chunked(request)
        if not chunked and not length:
            return None
        # A chunked body's size is known only at its end: it is charged as it arrives.
        first = 0 if chunked or length is None else length
        if not await self._charge(charge, request_cost(first), more=False):
            self.admission.refuse("inflight_bytes")
            return self._over_budget()
        if conn.they_are_waiting_for_100_continue:
            go_on = conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            await self._write(sock, go_on)
        return None

    def _release(self, cost: int) -> None:
        self.admission.release(cost)
        # Wake every request waiting for room; each tries its own charge again.
        self._budget_freed.set()
        self._budget_freed = asyncio.Event()

    async def _charge(self, charge: _Charge, total: int, *, more: bool = True) -> bool:
        """Raise ``charge`` to ``total`` bytes, waiting up to ``admission_wait_s`` for room.

        ``more``: the request was admitted before (see :meth:`Admission.try_charge`).
        """
        cost = max(0, total - charge.amount)
        if cost == 0 and more:
            return True
        if not self.admission.try_charge(cost, more=more):
            try:
                async with asyncio.timeout(self.limits.admission_wait_s):
                    while True:
                        await self._budget_freed.wait()
                        if self.admission.try_charge(cost, more=more):
                            break
            except TimeoutError:
                return False
        charge.amount = total
        return True

    async def _read_body(
        self, conn: h11.Connection, sock: socket.socket, charge: _Charge, *, chunked: bool
    ) -> bytearray | _Response | None:
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
                            return self._too_large()
                        # What has come is charged before more is read (at most one read
                        # of _BODY_READ is in memory uncharged).
                        if chunked and not await self._charge(charge, request_cost(len(body))):
                            self.admission.refuse("inflight_bytes")
                            return self._over_budget()
                    elif isinstance(part, h11.EndOfMessage):
                        return body
                    else:
                        return None
        except TimeoutError:
            self.admission.refuse("body_timeout")
            return _error(
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
        async with asyncio.timeout(self.read_timeout_s):
            await asyncio.get_running_loop().sock_sendall(sock, data)

    async def _send(
        self,
        conn: h11.Connection,
        sock: socket.socket,
        response: _Response,
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
        reason = HTTPStatus(response.status).phrase.encode()
        parts = [
            conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        ]
        if not head:
            parts.append(conn.send(h11.Data(data=response.body)))
        parts.append(conn.send(h11.EndOfMessage()))
        await self._write(sock, b"".join(p for p in parts if p is not None))

    async def _charge_parse(self, body: bytearray, charge: _Charge) -> _Response | None:
        """Refuse JSON nested too deep; charge what parsing ``body`` costs, or refuse it."""
        structure = scan_structure(body, MAX_JSON_DEPTH)
        if structure.depth > MAX_JSON_DEPTH:
            return _error(
                400,
                f"the body nests arrays and objects more than {MAX_JSON_DEPTH} deep; an "
                "inference request needs 3 levels around a tensor's data, and the data one "
                f"per dimension, at most {MAX_JSON_DEPTH - 3}",
            )
        cost = parse_cost(len(body), structure)
        if cost > self.limits.max_inflight_bytes:
            self.admission.refuse("body_too_large")
            return _error(
                413,
                f"the body holds {structure.arrays} arrays and {structure.objects} objects, "
                f"which would take {cost} bytes to parse, more than the "
                f"{self.limits.max_inflight_bytes} the local API has for requests in flight",
                close=True,
            )
        if not await self._charge(charge, cost):
            self.admission.refuse("inflight_bytes")
            return self._over_budget()
        return None

    def _too_large(self) -> _Response:
        return _error(413, f"the request body is over {self.max_body_bytes} bytes", close=True)

    def _over_budget(self) -> _Response:
        limits = self.limits
        response = _error(
            503,
            f"the local API has {limits.max_inflight_bytes} bytes for requests in flight and "
            f"they are taken; retry after {limits.retry_after_s} s",
            close=True,
        )
        response.headers.append(("Retry-After", str(limits.retry_after_s)))
        return response

    # -- routes --------------------------------------------------------------

    async def _dispatch(
        self, request: h11.Request, body: bytearray, charge: _Charge | None = None
    ) -> _Response:
        method = request.method.decode("ascii", "replace")
        path = urlsplit(request.target.decode("ascii", "replace")).path
        parts = [unquote(p) for p in path.split("/") if p]
        try:
            return await self._route(method, parts, request, body, charge or _Charge())
        except Exception:
            logger.exception("the local API failed on %s %s", method, path)
            return _error(500, "internal error in the local inference API")

    async def _route(
        self,
        method: str,
        parts: list[str],
        request: h11.Request,
        body: bytearray,
        charge: _Charge,
    ) -> _Response:
        if parts == ["metrics"]:
            return _only("GET", method) or _Response(
                200,
                self._metrics_text(),
                content_type="text/plain; version=0.0.4; charset=utf-8",
            )
        if parts == ["v2"]:
            return _only("GET", method) or _json(
                200, ServerMetadata(name="edgefleet-agent", version=agent.__version__)
            )
        if parts == ["v2", "health", "live"]:
            return _only("GET", method) or _Response(200, b'{"live":true}')
        if parts == ["v2", "health", "ready"]:
            if wrong := _only("GET", method):
                return wrong
            ready, reason = self._current_chain().readiness()
            return _Response(200, b'{"ready":true}') if ready else _error(503, reason)
        if len(parts) < 3 or parts[:2] != ["v2", "models"]:
            return _error(404, f"no route {'/' + '/'.join(parts)}; see /v2/models/{{name}}/infer")
        name, rest, version = parts[2], parts[3:], None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if rest == []:
            return _only("GET", method) or self._metadata(name, version)
        if rest == ["ready"]:
            return _only("GET", method) or self._model_ready(name, version)
        if rest == ["infer"]:
            return _only("POST", method) or await self._infer(name, version, request, body, charge)
        return _error(404, f"no route {'/' + '/'.join(parts)}")

    def _metrics_text(self) -> bytes:
        text = self.admission.metrics().encode()
        return text if self._metrics is None else text + self._metrics.exposition()

    def _current_chain(self) -> FallbackChain:
        return self._chain if isinstance(self._chain, FallbackChain) else self._chain()

    def _find_model(self, chain: FallbackChain, name: str, version: str | None) -> _Response | None:
        """An error response when this device does not serve ``name`` (at ``version``)."""
        manifest = chain.manifest
        if manifest is None:
            return _error(503, "no model is installed on this device yet")
        if name != manifest.name:
            return _error(404, f"no model named {name!r}; this device serves {manifest.name!r}")
        if version is not None and version not in chain.versions:
            return _error(
                404, f"model {name!r} has no version {version!r} here; it has {chain.versions}"
            )
        return None

    def _metadata(self, name: str, version: str | None) -> _Response:
        chain = self._current_chain()
        if missing := self._find_model(chain, name, version):
            return missing
        manifest = chain.manifest_of(version)
        assert manifest is not None  # _find_model checked the version
        return _json(200, model_metadata(manifest, chain.versions))

    def _model_ready(self, name: str, version: str | None) -> _Response:
        chain = self._current_chain()
        if missing := self._find_model(chain, name, version):
            return missing
        ready, reason = chain.readiness()
        if not ready:
            return _error(503, reason)
        return _Response(200, json.dumps({"name": name, "ready": True}).encode())

    async def _infer(
        self,
        name: str,
        version: str | None,
        request: h11.Request,
        body: bytearray,
        charge: _Charge,
    ) -> _Response:
        chain = self._current_chain()
        prepared = await self._decode(chain, name, version, request, body, charge)
        if isinstance(prepared, _Response):
            # Refused before the chain saw it (the chain counts what it refuses itself).
            if self._metrics is not None:
                self._metrics.inference.refused(
                    "client_error" if prepared.status < 500 else "unavailable"
                )
            return prepared
        tensors, request_id, wanted = prepared
        try:
            answer = await chain.infer(tensors, version=version)
        except InvalidInput as exc:
            return _error(422, str(exc))
        except UnknownVersion as exc:
            return _error(404, str(exc))
        except ChainNotReady as exc:
            return _error(503, str(exc))
        try:
            outputs = select_outputs(answer.outputs, wanted)
        except InferenceRequestError as exc:
            return _error(400, str(exc))
        response = encode_response(
            outputs,
            model_name=answer.model_name,
            model_version=answer.model_version,
            stage=answer.stage,
            escalated=answer.escalated,
            id=request_id,
        )
        return _json(200, response)

    async def _decode(
        self,
        chain: FallbackChain,
        name: str,
        version: str | None,
        request: h11.Request,
        body: bytearray,
        charge: _Charge,
    ) -> tuple[dict[str, npt.NDArray[Any]], str | None, list[RequestOutput] | None] | _Response:
        """The request's tensors, id and requested outputs; or the response refusing it."""
        if missing := self._find_model(chain, name, version):
            return missing
        if any(k == b"inference-header-content-length" for k, _ in request.headers):
            return _error(400, "the binary tensor data extension is not supported; send JSON data")
        if refused := await self._charge_parse(body, charge):
            return refused
        try:
            parsed = parse_request(body)
        except InferenceRequestError as exc:
            return _error(400, str(exc))
        except ValidationError as exc:
            return _error(400, describe_validation_error(exc))
        finally:
            body.clear()  # parsed, the body is dead weight for the rest of the request
        manifest = chain.manifest
        assert manifest is not None
        try:
            # The declared shapes against the model's before decoding allocates anything.
            check_declared_shapes(manifest, [(t.name, t.shape) for t in parsed.inputs])
        except InvalidInput as exc:
            return _error(422, str(exc))
        try:
            check_input_datatypes(manifest, parsed.inputs)
            tensors = decode_inputs(parsed)
            check_requested_outputs([t.name for t in manifest.outputs], parsed.outputs)
        except InferenceRequestError as exc:
            return _error(400, str(exc))
        # Not the parsed request itself: its data lists take several times the tensors' memory.
        return tensors, parsed.id, parsed.outputs


def parse_request(body: bytearray) -> InferenceRequest:
    """The request ``body`` holds, parsed by Python's json and checked by pydantic.

    Not by pydantic's own JSON parser: it builds a tree of its own before the
    Python objects, which costs about twice as much memory per array.
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InferenceRequestError(
            f"the body is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer of over 4300 digits
        raise InferenceRequestError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        kind = "an array" if isinstance(document, list) else "a single value"
        raise InferenceRequestError(
            f"Input should be an object (an inference request), the body is {kind}"
        )
    return InferenceRequest.model_validate(document)


def _only(allowed: str, method: str) -> _Response | None:
    if method == allowed or (allowed == "GET" and method == "HEAD"):
        return None
    response = _error(405, f"use {allowed} here, not {method}")
    response.headers.append(("Allow", allowed))
    return response


def _content_length(request: h11.Request) -> int | None:
    for key, value in request.headers:
        if key == b"content-length":
            return int(value)
    return None


def _chunked(request: h11.Request) -> bool:
    return any(k == b"transfer-encoding" and b"chunked" in v.lower() for k, v in request.headers)


def _raw_response(status: int, message: str, retry_after_s: int) -> bytes:
    """A complete ``Connection: close`` response, sent before any of the request is read."""
    body = ErrorResponse(error=message).model_dump_json().encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after_s}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
