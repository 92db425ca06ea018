"""Errors as the API answers them, and the middlewares that make every answer count.

Every refusal is JSON ``{"error": "..."}`` with a 4xx status saying what was
wrong; an unexpected exception is logged and answered 500 with no detail.
Each request is timed into ``edgefleet_api_request_seconds`` and each
refusal counted in ``edgefleet_api_requests_rejected_total`` by status.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from fleet_server.errors import (
    Conflict,
    FleetError,
    Forbidden,
    Invalid,
    NotFound,
    Unauthenticated,
    Unprocessable,
    kind_of,
)
from fleet_server.metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Errors a caller can cause: the domain's root; each kind is answered with one status.
CALLER_ERRORS = FleetError
HTTP_STATUS: Mapping[type[FleetError], int] = {
    Invalid: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Unprocessable: 422,
}
_FORWARDED_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx) and a message for the caller."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def http_status(exc: FleetError) -> int:
    """The HTTP status a domain error is answered with, by its kind."""
    return HTTP_STATUS[kind_of(exc)]


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _http_exception_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"nothing at {_clip(request.path)}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"{_clip(request.method, 20)} is not allowed on {_clip(request.path)}; use {allowed}"
    if exc.status == 413:
        return "the request body is too large"
    return exc.reason


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error; never let an exception reach aiohttp."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    except CALLER_ERRORS as exc:
        return error_response(http_status(exc), str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: exc.headers[k] for k in _FORWARDED_HEADERS if k in exc.headers}
        return error_response(exc.status, _http_exception_message(request, exc), headers)
    except Exception:
        log.exception("%s %s failed", request.method, _clip(request.path))
        return error_response(500, "internal error; the server's log has the details")


_rejections: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def rejection_counter(metrics: Metrics) -> Counter:
    """``edgefleet_api_requests_rejected_total`` in the server's registry (created once)."""
    counter = _rejections.get(metrics.registry)
    if counter is None:
        counter = Counter(
            "edgefleet_api_requests_rejected_total",
            "REST and hosting requests answered with an error, by status",
            ["status"],
            registry=metrics.registry,
        )
        _rejections[metrics.registry] = counter
    return counter


def observe_middleware(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Time every request and count every refusal (outermost, so it sees the final status)."""
    rejected = rejection_counter(metrics)

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()

        def account(status: int) -> None:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            method = request.method if request.method in _METHODS else "OTHER"
            metrics.api_latency.labels(method, route, str(status)).observe(
                time.perf_counter() - started
            )
            if status >= 400:
                rejected.labels(str(status)).inc()

        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a redirect or 304, which aiohttp sends itself
            account(exc.status)
            raise
        account(response.status)
        return response

    return observe
