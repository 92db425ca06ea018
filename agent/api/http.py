"""The local inference API: the Open Inference Protocol (KServe v2) over HTTP on localhost.

Routes::

    GET  /v2                                   server metadata
    GET  /v2/health/live                       200 while the process serves
    GET  /v2/health/ready                      200 when a model, or at least the safe default,
                                               can answer; 503 and the reason otherwise
    GET  /v2/models/{name}[/versions/{v}]         model metadata from the manifest
    GET  /v2/models/{name}[/versions/{v}]/ready   200 when the model can answer
    POST /v2/models/{name}[/versions/{v}]/infer   inference through the fallback chain

``{name}`` is the manifest's name. Every error has a JSON body
``{"error": "..."}`` that names the tensor at fault: 400 for a body that is not
a valid protocol request, 404 for an unknown route, model or version, 413 for a
body over the limit, 422 for a request that breaks the model's contract
(shape, dtype, NaN/Inf, valid range). A failing stage is no error — the chain
answers — so a 5xx only ever means a bug here.

HTTP/1.1 with keep-alive, one asyncio task per connection, parsed by h11: no
web framework, to keep the device process small (aiohttp alone would cost
~17 MB of a 64 MB budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Self
from urllib.parse import unquote, urlsplit

import h11
from pydantic import BaseModel, ValidationError

import agent
from agent.serving.chain import ChainNotReady, FallbackChain, UnknownVersion
from agent.serving.validation import InvalidInput
from protocol.inference import (
    ErrorResponse,
    InferenceRequest,
    InferenceRequestError,
    ServerMetadata,
    check_requested_outputs,
    decode_inputs,
    describe_validation_error,
    encode_response,
    model_metadata,
    select_outputs,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
_MAX_HEADER_BYTES = 16 * 1024
_READ_SIZE = 65536

ChainProvider = FallbackChain | Callable[[], FallbackChain]


@dataclass
class _Response:
    status: int
    body: bytes
    close: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json(status: int, body: BaseModel, *, close: bool = False) -> _Response:
    return _Response(status, body.model_dump_json(exclude_none=True).encode(), close)


def _error(status: int, message: str, *, close: bool = False) -> _Response:
    return _json(status, ErrorResponse(error=message), close=close)


class LocalApi:
    """Serves the fallback chain over HTTP until closed.

    ``chain`` is the chain, or a callable returning the chain to use for each
    request. Use as ``async with LocalApi(...) as api:``, or run
    ``api.serve_forever()`` as a task of a ``TaskGroup`` (cancel it to stop).
    ``port=0`` picks a free port; :attr:`port` tells which.
    """

    def __init__(
        self,
        chain: ChainProvider,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        idle_timeout_s: float = 60.0,
        read_timeout_s: float = 10.0,
    ) -> None:
        self._chain = chain
        self.host = host
        self._port = port
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.read_timeout_s = read_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def port(self) -> int:
        """The port served on (the one picked when constructed with ``port=0``)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen; returns once the socket is bound."""
        if self._server is None:
            self._server = await asyncio.start_server(self._connection, self.host, self._port)

    async def close(self) -> None:
        """Stop listening and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        try:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()
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

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        try:
            while True:
                head = False
                try:
                    request = await self._read_request(conn, reader, writer)
                    if request is None:
                        return
                    if isinstance(request, _Response):
                        response = request
                    else:
                        head = request[0].method == b"HEAD"
                        response = await self._dispatch(request[0], request[1])
                except h11.RemoteProtocolError as exc:
                    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                        return
                    response = _error(
                        exc.error_status_hint, f"malformed HTTP request: {exc}", close=True
                    )
                await self._send(conn, writer, response, head=head)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.LocalProtocolError):
            return
        except asyncio.CancelledError:
            # close() cancels open connections; ending quietly keeps asyncio from
            # reporting the cancellation as an error of the stream's callback.
            if not self._closing:
                raise
        except Exception:
            logger.exception("the local API failed on a connection")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes] | _Response | None:
        """The next request and its body; a response to send instead; ``None`` to hang up."""
        try:
            event = await self._next_event(conn, reader, self.idle_timeout_s)
        except TimeoutError:
            return None
        if not isinstance(event, h11.Request):
            return None
        length = _content_length(event)
        if length is not None and length > self.max_body_bytes:
            return self._too_large(close=True)
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        try:
            while True:
                part = await self._next_event(conn, reader, self.read_timeout_s)
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > self.max_body_bytes:
                        return self._too_large(close=True)
                elif isinstance(part, h11.EndOfMessage):
                    return event, bytes(body)
                else:
                    return None
        except TimeoutError:
            return _error(408, "the request body did not arrive in time", close=True)

    async def _next_event(
        self, conn: h11.Connection, reader: asyncio.StreamReader, timeout_s: float
    ) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout_s):
                data = await reader.read(_READ_SIZE)
            conn.receive_data(data)

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        response: _Response,
        *,
        head: bool = False,
    ) -> None:
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        if response.close:
            headers.append(("Connection", "close"))
        reason = HTTPStatus(response.status).phrase.encode()
        writer.write(
            conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        )
        if not head:
            writer.write(conn.send(h11.Data(data=response.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    def _too_large(self, *, close: bool) -> _Response:
        return _error(413, f"the request body is over {self.max_body_bytes} bytes", close=close)

    # -- routes --------------------------------------------------------------

    async def _dispatch(self, request: h11.Request, body: bytes) -> _Response:
        method = request.method.decode("ascii", "replace")
        path = urlsplit(request.target.decode("ascii", "replace")).path
        parts = [unquote(p) for p in path.split("/") if p]
        try:
            return await self._route(method, parts, request, body)
        except Exception:
            logger.exception("the local API failed on %s %s", method, path)
            return _error(500, "internal error in the local inference API")

    async def _route(
        self, method: str, parts: list[str], request: h11.Request, body: bytes
    ) -> _Response:
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
            return _only("POST", method) or await self._infer(name, version, request, body)
        return _error(404, f"no route {'/' + '/'.join(parts)}")

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
        self, name: str, version: str | None, request: h11.Request, body: bytes
    ) -> _Response:
        chain = self._current_chain()
        if missing := self._find_model(chain, name, version):
            return missing
        if any(k == b"inference-header-content-length" for k, _ in request.headers):
            return _error(400, "the binary tensor data extension is not supported; send JSON data")
        try:
            parsed = InferenceRequest.model_validate_json(body)
        except ValidationError as exc:
            return _error(400, describe_validation_error(exc))
        manifest = chain.manifest
        assert manifest is not None
        try:
            tensors = decode_inputs(parsed)
            check_requested_outputs([t.name for t in manifest.outputs], parsed.outputs)
        except InferenceRequestError as exc:
            return _error(400, str(exc))
        try:
            answer = await chain.infer(tensors, version=version)
        except InvalidInput as exc:
            return _error(422, str(exc))
        except UnknownVersion as exc:
            return _error(404, str(exc))
        except ChainNotReady as exc:
            return _error(503, str(exc))
        try:
            outputs = select_outputs(answer.outputs, parsed.outputs)
        except InferenceRequestError as exc:
            return _error(400, str(exc))
        response = encode_response(
            outputs,
            model_name=answer.model_name,
            model_version=answer.model_version,
            stage=answer.stage,
            escalated=answer.escalated,
            id=parsed.id,
        )
        return _json(200, response)


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
