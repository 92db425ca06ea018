"""The cloud endpoint's HTTP routes: the Open Inference Protocol (v2 REST) and ``/metrics``.

Every error is JSON ``{"error": "..."}`` saying what was refused and why; a
429 adds ``retry_after_s`` (seconds, a float) and ``reason`` (``quota`` or
``capacity``) and the ``Retry-After`` header (whole seconds, at least 1).
"""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleet_server.cloud.auth import basic_credentials
from fleet_server.cloud.service import (
    BadRequest,
    BodyTooLarge,
    CloudRefusal,
    CloudService,
    RateLimited,
    Unauthorized,
    Unavailable,
    UnknownModel,
)
from protocol.cli import edgefleet_version
from protocol.inference import ServerMetadata, model_metadata

SERVICE: web.AppKey[CloudService] = web.AppKey("cloud_service", CloudService)
REALM = 'Basic realm="edgefleet-cloud", charset="UTF-8"'


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def refusal_response(exc: CloudRefusal) -> web.Response:
    """The HTTP answer to a refusal."""
    if isinstance(exc, Unauthorized):
        response = _error(401, str(exc))
        response.headers["WWW-Authenticate"] = REALM
        return response
    if isinstance(exc, RateLimited):
        refusal = exc.refusal
        response = _error(
            429,
            refusal.message,
            retry_after_s=math.ceil(refusal.retry_after_s * 1000) / 1000,
            reason=refusal.reason,
        )
        response.headers["Retry-After"] = refusal.retry_after_header
        return response
    if isinstance(exc, Unavailable):
        response = _error(503, str(exc))
        response.headers["Retry-After"] = "5"
        return response
    if isinstance(exc, UnknownModel):
        return _error(404, str(exc))
    if isinstance(exc, BodyTooLarge):
        return _error(413, str(exc))
    if isinstance(exc, BadRequest):
        return _error(400, str(exc))
    return _error(500, str(exc))


async def infer(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    name = request.match_info["name"]
    version = request.match_info.get("version")
    try:
        device_id = await service.authenticate(
            basic_credentials(request.headers.get("Authorization"))
        )
        model = service.model(name, version)
        service.admit(device_id)
        started = time.perf_counter()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(
                f"the body is over the endpoint's limit of {service.config.max_body_bytes} bytes"
            ) from None
        response = await service.infer(device_id, model, body)
    except CloudRefusal as exc:
        # Names no authorised device asked for, or no model has, are not made labels.
        known = not isinstance(exc, (Unauthorized, UnknownModel))
        service.metrics.requests.labels(name if known else "-", exc.outcome).inc()
        if isinstance(exc, RateLimited):
            service.metrics.rate_limited.labels(exc.refusal.reason).inc()
        return refusal_response(exc)
    service.metrics.requests.labels(name, "ok").inc()
    service.metrics.latency.labels(name).observe(time.perf_counter() - started)
    return web.Response(
        body=response.model_dump_json(exclude_none=True), content_type="application/json"
    )


async def metadata(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        await service.authenticate(basic_credentials(request.headers.get("Authorization")))
        model = service.model(request.match_info["name"], request.match_info.get("version"))
    except CloudRefusal as exc:
        return refusal_response(exc)
    body = model_metadata(model.manifest)
    return web.Response(body=body.model_dump_json(), content_type="application/json")


async def model_ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        service.model(request.match_info["name"], request.match_info.get("version"))
    except UnknownModel as exc:
        return _error(404, str(exc))
    return web.json_response({"name": request.match_info["name"], "ready": True})


async def server_metadata(request: web.Request) -> web.Response:
    body = ServerMetadata(name="edgefleet-cloud", version=edgefleet_version(), extensions=[])
    return web.Response(body=body.model_dump_json(), content_type="application/json")


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.ready:
        return web.json_response({"ready": True})
    return web.json_response(
        {"ready": False, "error": "no verified cloud model is loaded yet"}, status=503
    )


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.Response(
        body=generate_latest(service.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


def make_app(service: CloudService) -> web.Application:
    """The endpoint's aiohttp application."""
    app = web.Application(client_max_size=service.config.max_body_bytes)
    app[SERVICE] = service
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{name}", metadata)
    app.router.add_get("/v2/models/{name}/versions/{version}", metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_get("/v2/models/{name}/versions/{version}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", infer)
    app.router.add_get("/metrics", metrics)
    return app
