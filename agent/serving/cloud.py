"""The cloud stage: an Open Inference Protocol client for the fleet's cloud endpoint.

HTTP/1.1 through h11 on asyncio streams, one request per connection: the
device process must stay small while it serves (numpy and the TFLite runtime
take most of a 64 MB budget), and an HTTP client library such as aiohttp
alone would cost ~17 MB. TLS is a matter of passing an ``ssl`` context (an
``https`` URL gets the system's default one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import h11
import numpy.typing as npt
from pydantic import ValidationError

from protocol.inference import (
    ErrorResponse,
    InferenceRequest,
    InferenceRequestError,
    InferenceResponse,
    StageName,
    decode_outputs,
    describe_validation_error,
    encode_request,
)

Tensors = dict[str, npt.NDArray[Any]]

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_READ_SIZE = 65536


class CloudError(Exception):
    """The cloud endpoint could not be reached or gave no usable answer; the message says which."""


class CloudClient:
    """Sends Open Inference Protocol requests to ``url`` (``http://host:port[/prefix]``)."""

    def __init__(
        self,
        url: str,
        *,
        ssl: ssl_module.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"cloud URL {url!r} must be http://host[:port] or https://host[:port]")
        self.url = url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._ssl = ssl or (
            ssl_module.create_default_context() if parts.scheme == "https" else None
        )
        self._max_response_bytes = max_response_bytes

    async def infer(
        self,
        model_name: str,
        request: InferenceRequest,
        *,
        version: str | None = None,
        timeout_s: float | None = None,
    ) -> InferenceResponse:
        """POST ``request`` to ``/v2/models/{model_name}[/versions/{version}]/infer``.

        Raises :class:`CloudError`, or ``TimeoutError`` after ``timeout_s``.
        """
        path = f"{self._prefix}/v2/models/{quote(model_name, safe='')}"
        if version is not None:
            path += f"/versions/{quote(version, safe='')}"
        body = request.model_dump_json(exclude_none=True).encode()
        async with asyncio.timeout(timeout_s):
            status, payload = await self._post(f"{path}/infer", body)
        if status != 200:
            raise CloudError(f"the cloud answered HTTP {status}: {_error_text(payload)}")
        try:
            return InferenceResponse.model_validate_json(payload)
        except ValidationError as exc:
            raise CloudError(
                f"the cloud's answer is not an inference response: {describe_validation_error(exc)}"
            ) from None

    async def _post(self, target: str, body: bytes) -> tuple[int, bytes]:
        try:
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        except OSError as exc:
            raise CloudError(
                f"cannot reach the cloud at {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [
                ("Host", f"{self._host}:{self._port}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
            writer.write(conn.send(h11.Request(method="POST", target=target, headers=headers)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return await self._read_response(conn, reader)
        except h11.ProtocolError as exc:
            raise CloudError(f"the cloud's answer is not valid HTTP: {exc}") from None
        except OSError as exc:
            raise CloudError(f"the connection to the cloud failed: {exc}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_response(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[int, bytes]:
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(_READ_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_response_bytes:
                    raise CloudError(f"the cloud's answer is over {self._max_response_bytes} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise CloudError("the cloud closed the connection before answering")


class CloudStage:
    """The fallback chain's cloud stage: the same model name, answered by the cloud endpoint.

    ``model_version`` is the version the cloud last answered with. The chain
    enforces ``timeout_s``.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        timeout_s: float = 2.0,
        ssl: ssl_module.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.name: StageName = "cloud"
        self.model_name = model_name
        self.model_version: str | None = None
        self.timeout_s: float | None = timeout_s
        self.client = CloudClient(url, ssl=ssl, max_response_bytes=max_response_bytes)

    async def infer(self, tensors: Mapping[str, npt.NDArray[Any]]) -> Tensors:
        response = await self.client.infer(self.model_name, encode_request(tensors))
        try:
            outputs = decode_outputs(response)
        except InferenceRequestError as exc:
            raise CloudError(f"the cloud's answer is malformed: {exc}") from None
        self.model_version = response.model_version
        return outputs


def _error_text(payload: bytes) -> str:
    try:
        return ErrorResponse.model_validate_json(payload).error
    except ValidationError:
        text = payload[:200].decode("utf-8", "replace").strip()
        return text or "(empty body)"
