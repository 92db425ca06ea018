"""The cloud stage: an Open Inference Protocol client for the fleet's cloud endpoint.

HTTP/1.1 through h11 on asyncio streams, one request per connection: the
device process must stay small while it serves (numpy and the TFLite runtime
take most of a 64 MB budget), and an HTTP client library such as aiohttp
alone would cost ~17 MB. TLS is a matter of passing an ``ssl`` context (an
``https`` URL gets the system's default one).

Authentication is HTTP Basic: the device id and the device's credential,
the one its MQTT connection uses. Every failure is a :class:`CloudError`
whose ``kind`` (:data:`protocol.hybrid.CLOUD_ERROR_KINDS`) says why:

- ``rate_limited``: HTTP 429 (:class:`CloudRateLimited`), over the device's
  quota or the endpoint's capacity; it carries ``retry_after_s`` (the body's
  ``retry_after_s``, else the ``Retry-After`` header's seconds, else
  :data:`DEFAULT_RETRY_AFTER_S`; at most :data:`MAX_RETRY_AFTER_S`) and
  ``reason`` (``quota`` or ``capacity`` when the body says so);
- ``unavailable``: the endpoint cannot be reached, or closed the connection
  before answering;
- ``server_error``: any other HTTP status than 200 (5xx, or a refusal such as 401);
- ``bad_answer``: not HTTP, too large, or not an inference response.

Timeouts raise ``TimeoutError`` (the caller's ``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import ssl as ssl_module
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote, urlsplit

import numpy.typing as npt
from pydantic import ValidationError

from protocol.hybrid import CloudErrorKind
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
# A 429 that says nothing of when to come back: wait this long.
DEFAULT_RETRY_AFTER_S: Final = 1.0
# A longer wait asked for is cut to this: the device asks again, it does not go quiet for hours.
MAX_RETRY_AFTER_S: Final = 600.0

RateLimitReason = Literal["quota", "capacity"]

if TYPE_CHECKING:
    import h11  # loaded with the first call to the cloud, not with the serving process


class CloudError(Exception):
    """The cloud endpoint could not be reached or gave no usable answer; the message says which."""

    def __init__(self, message: str, kind: CloudErrorKind = "server_error") -> None:
        super().__init__(message)
        self.kind: CloudErrorKind = kind


class CloudRateLimited(CloudError):
    """HTTP 429, over the device's quota or the endpoint's capacity: wait ``retry_after_s``."""

    def __init__(
        self, message: str, retry_after_s: float, reason: RateLimitReason | None = None
    ) -> None:
        super().__init__(message, "rate_limited")
        self.retry_after_s = retry_after_s
        self.reason = reason


class CloudClient:
    """Sends Open Inference Protocol requests to ``url`` (``http://host:port[/prefix]``)."""

    def __init__(
        self,
        url: str,
        *,
        ssl: ssl_module.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        username: str | None = None,
        password: str | None = None,
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
        self._authorization: str | None = None
        if username is not None and password is not None:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._authorization = f"Basic {token}"

    async def infer(
        self,
        model_name: str,
        request: InferenceRequest,
        *,
        version: str | None = None,
        timeout_s: float | None = None,
    ) -> InferenceResponse:
        """POST ``request`` to ``/v2/models/{model_name}[/versions/{version}]/infer``.

        Raises :class:`CloudError` (:class:`CloudRateLimited` for a 429), or
        ``TimeoutError`` after ``timeout_s``.
        """
        path = f"{self._prefix}/v2/models/{quote(model_name, safe='')}"
        if version is not None:
            path += f"/versions/{quote(version, safe='')}"
        body = request.model_dump_json(exclude_none=True).encode()
        async with asyncio.timeout(timeout_s):
            status, headers, payload = await self._post(f"{path}/infer", body)
        if status == 429:
            raise rate_limited(headers, payload)
        if status != 200:
            raise CloudError(f"the cloud answered HTTP {status}: {_error_text(payload)}")
        try:
            return InferenceResponse.model_validate_json(payload)
        except ValidationError as exc:
            why = describe_validation_error(exc)
            raise CloudError(
                f"the cloud's answer is not an inference response: {why}", "bad_answer"
            ) from None

    async def _post(self, target: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        import h11

        try:
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        except OSError as exc:
            raise CloudError(
                f"cannot reach the cloud at {self._host}:{self._port}: {exc.strerror or exc}",
                "unavailable",
            ) from None
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [
                ("Host", f"{self._host}:{self._port}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
            if self._authorization is not None:
                headers.append(("Authorization", self._authorization))
            writer.write(conn.send(h11.Request(method="POST", target=target, headers=headers)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return await self._read_response(conn, reader)
        except h11.ProtocolError as exc:
            raise CloudError(f"the cloud's answer is not valid HTTP: {exc}", "bad_answer") from None
        except OSError as exc:
            raise CloudError(f"the connection to the cloud failed: {exc}", "unavailable") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_response(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[int, dict[str, str], bytes]:
        import h11

        status = 0
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(_READ_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {
                    name.decode("latin-1").lower(): value.decode("latin-1")
                    for name, value in event.headers
                }
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_response_bytes:
                    raise CloudError(
                        f"the cloud's answer is over {self._max_response_bytes} bytes", "bad_answer"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise CloudError("the cloud closed the connection before answering", "unavailable")


class CloudStage:
    """The fallback chain's cloud stage: a model answered by the cloud endpoint.

    ``model_name`` is the model asked for at the endpoint (``None``: the
    chain names it, the plan's ``cloud_model`` or the served model's own
    name). ``model_version`` is the version the cloud last answered with.
    The chain enforces ``timeout_s``. ``username`` and ``password`` (the
    device id and its credential) authenticate every request.
    """

    def __init__(
        self,
        url: str,
        model_name: str | None = None,
        *,
        timeout_s: float = 2.0,
        ssl: ssl_module.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.name: StageName = "cloud"
        self.model_name = model_name
        self.model_version: str | None = None
        self.timeout_s: float | None = timeout_s
        self.client = CloudClient(
            url,
            ssl=ssl,
            max_response_bytes=max_response_bytes,
            username=username,
            password=password,
        )

    async def infer(
        self, tensors: Mapping[str, npt.NDArray[Any]], *, model_name: str | None = None
    ) -> Tensors:
        """Ask the endpoint's ``model_name`` (default: the stage's own) to answer ``tensors``."""
        name = model_name or self.model_name
        if name is None:
            raise CloudError("no cloud model is named for this request", "server_error")
        response = await self.client.infer(name, encode_request(tensors))
        try:
            outputs = decode_outputs(response)
        except InferenceRequestError as exc:
            raise CloudError(f"the cloud's answer is malformed: {exc}", "bad_answer") from None
        self.model_version = response.model_version
        return outputs


def rate_limited(headers: Mapping[str, str], payload: bytes) -> CloudRateLimited:
    """The error of a 429: its wait (body ``retry_after_s``, else ``Retry-After``) and reason."""
    retry_after: float | None = None
    reason: RateLimitReason | None = None
    error = ""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        value = body.get("retry_after_s")
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            retry_after = float(value)
        if body.get("reason") in ("quota", "capacity"):
            reason = body["reason"]
        if isinstance(body.get("error"), str):
            error = body["error"]
    if retry_after is None:
        try:
            retry_after = float(headers.get("retry-after", ""))
        except ValueError:
            retry_after = None
    if retry_after is None or not math.isfinite(retry_after) or retry_after < 0:
        retry_after = DEFAULT_RETRY_AFTER_S
    retry_after = min(retry_after, MAX_RETRY_AFTER_S)
    why = f" ({reason})" if reason else ""
    text = error or _error_text(payload)
    return CloudRateLimited(
        f"the cloud answered HTTP 429{why}: {text}; retry after {retry_after:g} s",
        retry_after,
        reason,
    )


def _error_text(payload: bytes) -> str:
    try:
        return ErrorResponse.model_validate_json(payload).error
    except ValidationError:
        text = payload[:200].decode("utf-8", "replace").strip()
        return text or "(empty body)"
