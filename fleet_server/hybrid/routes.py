"""The hybrid feature's REST operations: plans, the cloud's capacity, a device's weight and
opt-out. Each handler calls :class:`fleet_server.hybrid.service.PlanService` and nothing else."""

from __future__ import annotations

from aiohttp import web

from fleet_server.api.operations import AUTH_ERRORS, PRINCIPAL, SERVER, Operation, answer, body
from fleet_server.api.operations import query as parsed_query
from fleet_server.hybrid.views import capacity_view, device_hybrid_view, plan_view
from protocol.api.base import API_PREFIX
from protocol.api.plans import (
    CapacityView,
    DeviceHybridChange,
    DeviceHybridView,
    PlanList,
    PlanQuery,
    PlanView,
    SetCapacity,
)


async def list_plans(request: web.Request) -> web.StreamResponse:
    q = parsed_query(request, PlanQuery)
    server = request.app[SERVER]
    shown = await server.plans.plans(server.db, q.device_id)
    return answer(PlanList(plans=[plan_view(s) for s in shown]))


async def get_plan(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    shown = await server.plans.plan(server.db, request.match_info["device_id"])
    return answer(plan_view(shown))


async def get_capacity(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    return answer(capacity_view(await server.plans.capacity(server.db)))


async def set_capacity(request: web.Request) -> web.StreamResponse:
    b = body(request, SetCapacity)
    server = request.app[SERVER]
    capacity = await server.plans.set_capacity(
        server.db, capacity=b.capacity, headroom=b.headroom, actor=request[PRINCIPAL].actor
    )
    return answer(capacity_view(capacity))


async def set_device_hybrid(request: web.Request) -> web.StreamResponse:
    b = body(request, DeviceHybridChange)
    server = request.app[SERVER]
    device = await server.plans.set_device(
        server.db,
        request.match_info["device_id"],
        weight=b.weight,
        offload_opt_out=b.offload_opt_out,
        actor=request[PRINCIPAL].actor,
    )
    return answer(device_hybrid_view(device))


V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", f"{V}/plans", list_plans, "listPlans",
        "Every device's hybrid plan (or one device's), with what it was planned from and how "
        "the device follows it",
        tag="hybrid", auth="viewer", query=PlanQuery, response=PlanList,
        errors=(*AUTH_ERRORS, 422),
    ),
    Operation(
        "GET", f"{V}/plans/{{device_id}}", get_plan, "getPlan",
        "A device's hybrid plan: inputs, share, tau, expected and observed offload, agreement, "
        "why it was planned again",
        tag="hybrid", auth="viewer", response=PlanView, errors=(*AUTH_ERRORS, 404),
    ),
    Operation(
        "GET", f"{V}/cloud/capacity", get_capacity, "getCloudCapacity",
        "The cloud endpoint's capacity the planner splits, and its headroom",
        tag="hybrid", auth="viewer", response=CapacityView, errors=AUTH_ERRORS,
    ),
    Operation(
        "PUT", f"{V}/cloud/capacity", set_capacity, "setCloudCapacity",
        "Set the cloud endpoint's capacity and headroom; the fleet is planned again at once",
        tag="hybrid", auth="operator", body=SetCapacity, response=CapacityView,
        errors=(400, *AUTH_ERRORS, 413, 422),
    ),
    Operation(
        "PATCH", f"{V}/devices/{{device_id}}/hybrid", set_device_hybrid, "setDeviceHybrid",
        "Set a device's weight in the split of the cloud's capacity and whether its data may "
        "leave it; the fleet is planned again at once",
        tag="hybrid", auth="operator", body=DeviceHybridChange, response=DeviceHybridView,
        errors=(400, *AUTH_ERRORS, 404, 409, 413, 422),
    ),
)
# fmt: on
