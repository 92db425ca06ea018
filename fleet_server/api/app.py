"""The fleet server's aiohttp application: REST API, device hosting, OpenAPI, metrics."""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from fleet_server.api import hosting
from fleet_server.api.errors import (
    ApiError,
    errors_middleware,
    observe_middleware,
    rejection_counter,
)
from fleet_server.api.openapi import openapi_document
from fleet_server.api.operations import DEVICE_AUTH, SERVER, Operation, answer, bind
from fleet_server.api.security import DeviceAuthenticator
from fleet_server.assignments import routes as assignment_routes
from fleet_server.audit import routes as audit_routes
from fleet_server.dashboard import add_routes as add_dashboard_routes
from fleet_server.db.models import Device
from fleet_server.devices import routes as device_routes
from fleet_server.drift import routes as drift_routes
from fleet_server.drift import update_gauges
from fleet_server.hybrid import routes as hybrid_routes
from fleet_server.labels import routes as labels_routes
from fleet_server.published import routes as published_routes
from fleet_server.rollouts import routes as rollout_routes
from fleet_server.tokens import bootstrap_admin_token
from fleet_server.tokens import routes as token_routes
from protocol.api.base import API_PREFIX, Health

if TYPE_CHECKING:
    from fleet_server.server import FleetServer

log = logging.getLogger(__name__)

OPENAPI: web.AppKey[bytes] = web.AppKey("openapi")


def _version() -> str:
    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0"


async def health(request: web.Request) -> web.StreamResponse:
    try:
        async with request.app[SERVER].db.session() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:  # any database failure means "not ready", never a crash
        log.warning("health check: the database does not answer: %s", exc)
        raise ApiError(503, "the database does not answer", {"Retry-After": "5"}) from None
    return answer(Health())


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def metrics(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    try:
        # Counted from the database so every replica reports the whole fleet.
        async with server.db.session() as session:
            total = await session.scalar(
                select(func.count()).select_from(Device).where(Device.decommissioned_at.is_(None))
            )
            online = await session.scalar(
                select(func.count()).select_from(Device).where(Device.online.is_(True))
            )
            await update_gauges(session, server.metrics)
        server.metrics.devices_registered.set(total or 0)
        server.metrics.devices_online.set(online or 0)
    except Exception as exc:  # stale gauges beat no metrics at all
        log.warning("metrics: cannot count devices: %s", exc)
    return web.Response(
        body=generate_latest(server.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


# fmt: off
META: tuple[Operation, ...] = (
    Operation(
        "GET", "/healthz", health, "health", "Is the server up, its database reachable",
        tag="meta", auth="public", response=Health, errors=(503,),
    ),
    Operation(
        "GET", f"{API_PREFIX}/openapi.json", openapi, "getOpenApi", "This document",
        tag="meta", auth="public",
    ),
    Operation(
        "GET", "/metrics", metrics, "getMetrics", "Prometheus metrics (text exposition format)",
        tag="meta", auth="public", media_type="text/plain",
    ),
)
# fmt: on

# The order the OpenAPI document lists the operations in (its paths and schemas follow it):
# the published document's, kept as features move their operations into their own folders.
DOCUMENT_ORDER = [
    "health",
    "listDevices",
    "registerDevice",
    "enrolDevice",
    "getDevice",
    "tagDevice",
    "listDeviceEvents",
    "createProvisioningToken",
    "listReleases",
    "pushRelease",
    "createAssignment",
    "decommissionDevice",
    "rotateDeviceCredentials",
    "yankRelease",
    "getDirectorTrustedRoot",
    "listAssignments",
    "cancelAssignment",
    "listTokens",
    "createToken",
    "revokeToken",
    "listAudit",
    "verifyAudit",
    "getAuditHead",
    "getDrift",
    "listAlerts",
    "getAlert",
    "acknowledgeAlert",
    "listSilences",
    "createSilence",
    "expireSilence",
    "listDeviceWindows",
    "postLabels",
    "getOpenApi",
    "getMetrics",
    "getRepositoryMetadata",
    "getRepositoryTarget",
    "getDirectorRoot",
    "getDirectorMetadata",
    "createRollout",
    "listRollouts",
    "getRollout",
    "pauseRollout",
    "resumeRollout",
    "promoteRollout",
    "abortRollout",
]


def in_document_order(operations: tuple[Operation, ...]) -> tuple[Operation, ...]:
    """``operations`` in :data:`DOCUMENT_ORDER`; any it does not name last, as given."""
    rank = {operation_id: i for i, operation_id in enumerate(DOCUMENT_ORDER)}
    return tuple(sorted(operations, key=lambda op: rank.get(op.operation_id, len(rank))))


OPERATIONS: tuple[Operation, ...] = in_document_order(
    (
        *device_routes.OPERATIONS,
        *assignment_routes.OPERATIONS,
        *published_routes.OPERATIONS,
        *token_routes.OPERATIONS,
        *audit_routes.OPERATIONS,
        *drift_routes.OPERATIONS,
        *labels_routes.OPERATIONS,
        *rollout_routes.OPERATIONS,
        *hybrid_routes.OPERATIONS,
        *META,
        *hosting.OPERATIONS,
    )
)


def build_app(server: FleetServer) -> web.Application:
    """The aiohttp application of ``server``.

    On start-up it creates the first admin token if there is none
    (:func:`fleet_server.tokens.bootstrap_admin_token`).
    """
    app = web.Application(middlewares=[observe_middleware(server.metrics), errors_middleware])
    app[SERVER] = server
    app[DEVICE_AUTH] = DeviceAuthenticator()
    app[OPENAPI] = json.dumps(openapi_document(OPERATIONS, _version()), indent=1).encode()
    rejection_counter(server.metrics)  # present in /metrics before the first refusal
    for op in OPERATIONS:
        handler = bind(op)
        if op.method == "GET":
            app.router.add_get(op.path, handler, name=op.operation_id)
        else:
            app.router.add_route(op.method, op.path, handler, name=op.operation_id)
    add_dashboard_routes(app)

    async def bootstrap(app: web.Application) -> None:
        await bootstrap_admin_token(server.db, server.config.data_dir)

    app.on_startup.append(bootstrap)
    return app
