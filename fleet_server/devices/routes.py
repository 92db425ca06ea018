"""The devices feature's REST operations: list, show, register, enrol, tag, events,
decommission, credentials, provisioning tokens.

Each handler parses nothing itself (its :class:`Operation` declares the query
and body) and calls :mod:`fleet_server.devices.service`.
"""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from fleet_server.api.operations import (
    AUTH_ERRORS,
    DEVICE_AUTH,
    PRINCIPAL,
    SERVER,
    Operation,
    answer,
    body,
    query,
)
from fleet_server.devices import service
from fleet_server.devices.views import device_view, event_view, with_refusals
from protocol.api.base import API_PREFIX
from protocol.api.devices import (
    DecommissionRequest,
    DeviceCredentials,
    DeviceEventList,
    DeviceList,
    DeviceQuery,
    DeviceView,
    EnrolDevice,
    EventQuery,
    ProvisioningTokenCreated,
    ProvisioningTokenRequest,
    RegisterDevice,
    TagChange,
)


def _credentials(
    request: web.Request, device_id: str, password: str, view: DeviceView
) -> DeviceCredentials:
    config = request.app[SERVER].config
    namespace = config.namespace if config.mqtt_url else None
    return DeviceCredentials(
        device_id=device_id, password=password, device=view, mqtt_namespace=namespace
    )


async def list_devices(request: web.Request) -> web.StreamResponse:
    q = query(request, DeviceQuery)
    devices = await service.list_devices(
        request.app[SERVER].db,
        tag=q.tag,
        hardware_id=q.hardware_id,
        online=q.online,
        include_decommissioned=q.include_decommissioned,
    )
    return answer(DeviceList(devices=[device_view(d) for d in devices]))


async def get_device(request: web.Request) -> web.StreamResponse:
    shown = await service.show_device(request.app[SERVER].db, request.match_info["device_id"])
    return answer(with_refusals(device_view(shown.device), shown.refusals, shown.warning))


async def register_device(request: web.Request) -> web.StreamResponse:
    b = body(request, RegisterDevice)
    server = request.app[SERVER]
    device, password = await service.register_device(
        server.db,
        server.assignments,
        device_id=b.device_id,
        hardware_id=b.hardware_id,
        region=b.region,
        timezone=b.timezone,
        tags=b.tags,
        actor=request[PRINCIPAL].actor,
        reuse_decommissioned=b.reuse_decommissioned,
    )
    request.app[DEVICE_AUTH].forget(device.id)
    return answer(_credentials(request, device.id, password, device_view(device)), 201)


async def enrol_device(request: web.Request) -> web.StreamResponse:
    b = body(request, EnrolDevice)
    server = request.app[SERVER]
    device, password = await service.enrol_device(
        server.db,
        server.assignments,
        token=b.token,
        device_id=b.device_id,
        hardware_id=b.hardware_id,
        region=b.region,
        timezone=b.timezone,
        tags=b.tags,
    )
    request.app[DEVICE_AUTH].forget(device.id)
    return answer(_credentials(request, device.id, password, device_view(device)), 201)


async def tag_device(request: web.Request) -> web.StreamResponse:
    b = body(request, TagChange)
    server = request.app[SERVER]
    device = await service.tag_device(
        server.db,
        server.assignments,
        request.match_info["device_id"],
        add=b.add,
        remove=b.remove,
        actor=request[PRINCIPAL].actor,
    )
    return answer(device_view(device))


async def device_events(request: web.Request) -> web.StreamResponse:
    q = query(request, EventQuery)
    rows = await service.device_events(
        request.app[SERVER].db, request.match_info["device_id"], q.limit
    )
    return answer(DeviceEventList(events=[event_view(row) for row in rows]))


async def create_provisioning_token(request: web.Request) -> web.StreamResponse:
    b = body(request, ProvisioningTokenRequest)
    token, row = await service.create_provisioning_token(
        request.app[SERVER].db,
        actor=request[PRINCIPAL].actor,
        hardware_id=b.hardware_id,
        tags=b.tags,
        uses=b.uses,
        ttl=timedelta(seconds=b.ttl_s),
    )
    created = ProvisioningTokenCreated(
        id=row.id,
        token=token,
        hardware_id=row.hardware_id,
        tags=list(row.tags),
        uses=row.uses_left,
        expires_at=row.expires_at,
    )
    return answer(created, 201)


async def decommission_device(request: web.Request) -> web.StreamResponse:
    b = body(request, DecommissionRequest)
    server = request.app[SERVER]
    device = await service.decommission(
        server.db,
        server.assignments,
        request.match_info["device_id"],
        reason=b.reason,
        actor=request[PRINCIPAL].actor,
    )
    # This replica forgets the credential now; others within the authenticator's TTL.
    request.app[DEVICE_AUTH].forget(device.id)
    return answer(device_view(device))


async def rotate_device_credentials(request: web.Request) -> web.StreamResponse:
    device, password = await service.rotate_credentials(
        request.app[SERVER].db, request.match_info["device_id"], actor=request[PRINCIPAL].actor
    )
    request.app[DEVICE_AUTH].forget(device.id)
    return answer(_credentials(request, device.id, password, device_view(device)))


V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", f"{V}/devices", list_devices, "listDevices", "List devices",
        tag="devices", auth="viewer", query=DeviceQuery, response=DeviceList,
        errors=(*AUTH_ERRORS, 422),
    ),
    Operation(
        "POST", f"{V}/devices", register_device, "registerDevice",
        "Pre-register a device; its password is in the answer, only there",
        tag="devices", auth="admin", body=RegisterDevice, response=DeviceCredentials,
        status=201, errors=(400, *AUTH_ERRORS, 409, 413, 422),
    ),
    Operation(
        "POST", f"{V}/devices/enrol", enrol_device, "enrolDevice",
        "A device enrols itself with a provisioning token (no bearer token)",
        tag="devices", auth="public", body=EnrolDevice, response=DeviceCredentials,
        status=201, errors=(400, 401, 409, 413, 422),
    ),
    Operation(
        "GET", f"{V}/devices/{{device_id}}", get_device, "getDevice", "Show a device",
        tag="devices", auth="viewer", response=DeviceView, errors=(*AUTH_ERRORS, 404),
    ),
    Operation(
        "PATCH", f"{V}/devices/{{device_id}}/tags", tag_device, "tagDevice",
        "Add and remove a device's tags",
        tag="devices", auth="operator", body=TagChange, response=DeviceView,
        errors=(400, *AUTH_ERRORS, 404, 413, 422),
    ),
    Operation(
        "GET", f"{V}/devices/{{device_id}}/events", device_events, "listDeviceEvents",
        "A device's reported events, newest first",
        tag="devices", auth="viewer", query=EventQuery, response=DeviceEventList,
        errors=(*AUTH_ERRORS, 404, 422),
    ),
    Operation(
        "POST", f"{V}/provisioning-tokens", create_provisioning_token,
        "createProvisioningToken", "Create a token devices enrol themselves with",
        tag="devices", auth="admin", body=ProvisioningTokenRequest,
        response=ProvisioningTokenCreated, status=201, errors=(400, *AUTH_ERRORS, 413, 422),
    ),
    Operation(
        "POST", f"{V}/devices/{{device_id}}/decommission", decommission_device,
        "decommissionDevice",
        "Decommission a device: its credentials stop working, its assignment is withdrawn, "
        "its history stays; hidden from the device list unless include_decommissioned",
        tag="devices", auth="admin", body=DecommissionRequest, response=DeviceView,
        errors=(400, *AUTH_ERRORS, 404, 409, 413, 422),
    ),
    Operation(
        "POST", f"{V}/devices/{{device_id}}/credentials", rotate_device_credentials,
        "rotateDeviceCredentials",
        "Give a device a new password (in the answer, only there); the old one stops "
        "working at once",
        tag="devices", auth="admin", response=DeviceCredentials,
        errors=(*AUTH_ERRORS, 404, 409),
    ),
)
# fmt: on
