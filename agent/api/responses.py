"""What the local API answers: a status, a JSON body and the headers around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus

from pydantic import BaseModel

from protocol.inference import ErrorResponse


@dataclass
class Response:
    """One response; ``close`` ends the connection after it."""

    status: int
    body: bytes
    close: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


def json_response(status: int, body: BaseModel, *, close: bool = False) -> Response:
    """``body`` as JSON, without its unset fields."""
    return Response(status, body.model_dump_json(exclude_none=True).encode(), close)


def error_response(status: int, message: str, *, close: bool = False) -> Response:
    """The protocol's error body ``{"error": message}``."""
    return json_response(status, ErrorResponse(error=message), close=close)


def retry_later(message: str, retry_after_s: int) -> Response:
    """A ``503`` that closes the connection and says when to retry."""
    response = error_response(503, message, close=True)
    response.headers.append(("Retry-After", str(retry_after_s)))
    return response


def raw_busy_response(message: str, retry_after_s: int) -> bytes:
    """A complete ``503`` with ``Connection: close``, sent before any of the request is read."""
    body = ErrorResponse(error=message).model_dump_json().encode()
    head = (
        f"HTTP/1.1 503 {HTTPStatus(503).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after_s}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
