"""One declaration per HTTP operation: who may call it, what it reads, what it answers.

:class:`Operation` is the single source of truth for a route. :func:`bind`
turns it into an aiohttp handler that authenticates the caller and parses
the path, query and body before the handler runs (in that order: 401/403
before 404/422), and :mod:`fleet_server.api.openapi` writes the OpenAPI
document from the same declarations, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from fleet_server.api.errors import ApiError
from fleet_server.api.security import DeviceAuthenticator, authenticate_operator
from fleet_server.tokens import Principal
from protocol.api.assignments import ASSIGNMENT_ID_PATTERN
from protocol.api.rollouts import ROLLOUT_ID_PATTERN
from protocol.api.tokens import ROLES, TOKEN_ID_PATTERN
from protocol.topics import DEVICE_ID_PATTERN

if TYPE_CHECKING:
    from fleet_server.server import FleetServer

Auth = Literal["public", "viewer", "operator", "admin", "device"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

SERVER: web.AppKey[FleetServer] = web.AppKey("server")
DEVICE_AUTH: web.AppKey[DeviceAuthenticator] = web.AppKey("device_auth")
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
DEVICE: web.RequestKey[str] = web.RequestKey("device")
QUERY: web.RequestKey[BaseModel] = web.RequestKey("query")
BODY: web.RequestKey[BaseModel] = web.RequestKey("body")

# What every operation behind a token may answer besides its own errors.
AUTH_ERRORS = (401, 403)

MAX_JSON_BODY = 1 << 20

# Path parameters and the values they accept; anything else is a 404.
FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
PATH_PARAMETERS: dict[str, str] = {
    "device_id": DEVICE_ID_PATTERN.pattern,
    "token_id": TOKEN_ID_PATTERN,
    "assignment_id": ASSIGNMENT_ID_PATTERN,
    "name": FILE_NAME,
    "file": FILE_NAME,
    "alert_id": r"^[1-9][0-9]{0,17}$",
    "silence_id": r"^[1-9][0-9]{0,17}$",
    "rollout_id": ROLLOUT_ID_PATTERN,
}
_PATH_CHECKS = {name: re.compile(pattern) for name, pattern in PATH_PARAMETERS.items()}


@dataclass(frozen=True)
class Operation:
    """An HTTP operation and everything the server and its OpenAPI document say about it."""

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    auth: Auth
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    other_success: tuple[int, ...] = ()
    errors: tuple[int, ...] = ()
    media_type: str = "application/json"
    body_limit: int = MAX_JSON_BODY
    description: str = ""

    @property
    def path_parameters(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)


def bind(op: Operation) -> Handler:
    """The aiohttp handler of ``op``: authenticate, parse, then run the operation."""

    async def handle(request: web.Request) -> web.StreamResponse:
        server = request.app[SERVER]
        if op.auth in ROLES:
            request[PRINCIPAL] = await authenticate_operator(server, request, op.auth)
        elif op.auth == "device":
            request[DEVICE] = await request.app[DEVICE_AUTH].device(server, request)
        for name in op.path_parameters:
            if not _PATH_CHECKS[name].fullmatch(request.match_info[name]):
                raise ApiError(404, f"nothing at {request.path[:200]}")
        if op.query is not None:
            request[QUERY] = parse_query(request, op.query)
        if op.body is not None:
            request[BODY] = parse_body(await read_body(request, op.body_limit), op.body)
        return await op.handler(request)

    handle.__name__ = op.operation_id
    return handle


def body(request: web.Request, model: type[M]) -> M:
    """The parsed body of ``request`` (its operation declared ``model``)."""
    value = request[BODY]
    if not isinstance(value, model):
        raise TypeError(f"the operation's body is {type(value).__name__}, not {model.__name__}")
    return value


def query(request: web.Request, model: type[M]) -> M:
    """The parsed query of ``request`` (its operation declared ``model``)."""
    value = request[QUERY]
    if not isinstance(value, model):
        raise TypeError(f"the operation's query is {type(value).__name__}, not {model.__name__}")
    return value


def answer(model: BaseModel, status: int = 200) -> web.Response:
    """``model`` as the JSON answer, with ``status``."""
    return web.json_response(text=model.model_dump_json(), status=status)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than ``limit`` without reading it all."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"the body is {request.content_length} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p)[:100] for p in err["loc"]) or "body"
        parts.append(f"{prefix}{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


_NOT_AN_OBJECT = {"model_type", "model_attributes_type", "dict_type"}


def parse_body(raw: bytes, model: type[M]) -> M:
    """Parse a JSON body: 400 if it is not a JSON object, 422 naming the field if invalid."""
    if not raw.strip():
        raise ApiError(400, "the body is empty; expected a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        if not first["loc"] and first["type"] in _NOT_AN_OBJECT:
            raise ApiError(400, "the body must be a JSON object") from None
        raise ApiError(422, _describe(exc)) from None


def parse_query(request: web.Request, model: type[M]) -> M:
    """Parse the query string (the first value of each parameter); 422 naming the parameter."""
    values = {key: request.query.getone(key) for key in request.query}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ApiError(422, _describe(exc, "query ")) from None
