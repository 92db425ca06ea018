"""The operators' REST API under ``/api/v1``: devices, releases, assignments, tokens, audit.

Each handler does one thing in one transaction, through the service modules
(registry, releases, director, auth, audit), and answers with a model of
:mod:`protocol.api`. Work that must follow the commit (creating a device's
director repository, announcing an assignment over MQTT) runs after it, and
its failure is logged without undoing what was committed: the device finds
its assignment at its next poll either way.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace
from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import Text, cast, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server import lifecycle, registry
from fleet_server.api.errors import ApiError
from fleet_server.api.operations import (
    DEVICE_AUTH,
    PRINCIPAL,
    SERVER,
    Operation,
    answer,
    body,
    query,
)
from fleet_server.assignments import AssignmentResult as Recorded
from fleet_server.assignments import (
    current_assignment,
    current_assignments,
    recent_refusals,
    refusal_of,
    refusal_warning,
    rule_label,
)
from fleet_server.auth import create_token, list_tokens, revoke_token
from fleet_server.db.models import (
    ApiToken,
    Assignment,
    AssignmentRule,
    Device,
    DeviceEventRow,
    ProvisioningToken,
    Release,
)
from fleet_server.published.routes import release_view
from fleet_server.published.service import find_release
from fleet_server.stored_json import show_object, show_value
from protocol.api import (
    API_PREFIX,
    AssignmentCancelled,
    AssignmentItem,
    AssignmentList,
    AssignmentQuery,
    AssignmentRequest,
    AssignmentResult,
    AssignmentView,
    DecommissionRequest,
    DeviceCredentials,
    DeviceEventList,
    DeviceEventView,
    DeviceList,
    DeviceQuery,
    DeviceRefusal,
    DeviceView,
    EnrolDevice,
    EventQuery,
    Health,
    ProvisioningTokenCreated,
    ProvisioningTokenRequest,
    RegisterDevice,
    TagChange,
    TokenCreated,
    TokenList,
    TokenRequest,
    TokenView,
)
from protocol.messages import FREEFORM_BOUNDS

log = logging.getLogger(__name__)


def device_view(d: Device) -> DeviceView:
    reported = show_value(d.reported, FREEFORM_BOUNDS, "report") if d.reported else None
    return DeviceView(
        id=d.id,
        hardware_id=d.hardware_id,
        region=d.region,
        tags=list(d.tags or []),
        enrolled_at=d.enrolled_at,
        online=bool(d.online),
        last_seen_at=d.last_seen_at,
        agent_version=d.agent_version,
        active_bundle=d.active_bundle,
        installed_counter=d.installed_counter or 0,
        phase=d.phase,
        assigned_target=d.assigned_target,
        director_version=d.director_version or 0,
        reported=reported.value if reported is not None and reported.omitted is None else None,
        reported_omitted=reported.omitted if reported is not None else None,
        reported_at=d.reported_at,
        decommissioned_at=d.decommissioned_at,
        decommission_reason=d.decommission_reason,
    )


def token_view(t: ApiToken) -> TokenView:
    return TokenView(
        id=t.id,
        name=t.name,
        role=t.role,
        created_at=t.created_at,
        revoked_at=t.revoked_at,
    )


# -- health --------------------------------------------------------------------


async def health(request: web.Request) -> web.StreamResponse:
    try:
        async with request.app[SERVER].db.session() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:  # any database failure means "not ready", never a crash
        log.warning("health check: the database does not answer: %s", exc)
        raise ApiError(503, "the database does not answer", {"Retry-After": "5"}) from None
    return answer(Health())


# -- devices -------------------------------------------------------------------


async def list_devices(request: web.Request) -> web.StreamResponse:
    q = query(request, DeviceQuery)
    async with request.app[SERVER].db.session() as session:
        devices = await registry.list_devices(
            session,
            tag=q.tag,
            hardware_id=q.hardware_id,
            online=q.online,
            include_decommissioned=q.include_decommissioned,
        )
        return answer(DeviceList(devices=[device_view(d) for d in devices]))


async def get_device(request: web.Request) -> web.StreamResponse:
    async with request.app[SERVER].db.session() as session:
        device = await registry.get_device(session, request.match_info["device_id"])
        view = await _with_refusals(session, device, device_view(device))
        return answer(view)


async def _after_enrolment(request: web.Request, device_id: str) -> None:
    request.app[DEVICE_AUTH].forget(device_id)
    try:
        await request.app[SERVER].assignments.register(device_id)
    except Exception:
        # The first assignment creates the repository anyway; the credentials must not be lost.
        log.exception("could not create the director repository of %s", device_id)


def _credentials(
    request: web.Request, device_id: str, password: str, view: DeviceView
) -> DeviceCredentials:
    config = request.app[SERVER].config
    namespace = config.namespace if config.mqtt_url else None
    return DeviceCredentials(
        device_id=device_id, password=password, device=view, mqtt_namespace=namespace
    )


async def register_device(request: web.Request) -> web.StreamResponse:
    b = body(request, RegisterDevice)
    async with request.app[SERVER].db.session() as session:
        device, password = await registry.create_device(
            session,
            device_id=b.device_id,
            hardware_id=b.hardware_id,
            region=b.region,
            tags=b.tags,
            actor=request[PRINCIPAL].actor,
            reuse_decommissioned=b.reuse_decommissioned,
        )
        ruled = await _apply_tag_rules(
            request, session, device, device.tags, request[PRINCIPAL].actor
        )
        view = device_view(device)
    await _after_enrolment(request, device.id)
    await _sign_ruled(request, ruled)
    return answer(_credentials(request, device.id, password, view), 201)


async def enrol_device(request: web.Request) -> web.StreamResponse:
    b = body(request, EnrolDevice)
    async with request.app[SERVER].db.session() as session:
        device, password = await registry.enrol(
            session,
            token=b.token,
            device_id=b.device_id,
            hardware_id=b.hardware_id,
            region=b.region,
            tags=b.tags,
        )
        ruled = await _apply_tag_rules(request, session, device, device.tags, f"device:{device.id}")
        view = device_view(device)
    await _after_enrolment(request, device.id)
    await _sign_ruled(request, ruled)
    return answer(_credentials(request, device.id, password, view), 201)


async def tag_device(request: web.Request) -> web.StreamResponse:
    b = body(request, TagChange)
    async with request.app[SERVER].db.session() as session:
        before = set((await registry.get_device(session, request.match_info["device_id"])).tags)
        device = await registry.set_tags(
            session,
            request.match_info["device_id"],
            add=b.add,
            remove=b.remove,
            actor=request[PRINCIPAL].actor,
        )
        gained = set(device.tags) - before
        ruled = await _apply_tag_rules(request, session, device, gained, request[PRINCIPAL].actor)
        view = device_view(device)
    await _sign_ruled(request, ruled)
    return answer(view)


async def device_events(request: web.Request) -> web.StreamResponse:
    q = query(request, EventQuery)
    async with request.app[SERVER].db.session() as session:
        device = await registry.get_device(session, request.match_info["device_id"])
        # Details as the text stored, so whatever an older version let in is shown as a
        # note instead of failing the whole list (see fleet_server.stored_json).
        rows = await session.execute(
            select(
                DeviceEventRow.message_id,
                DeviceEventRow.kind,
                DeviceEventRow.event,
                DeviceEventRow.at,
                DeviceEventRow.received_at,
                cast(DeviceEventRow.details, Text),
            )
            .where(DeviceEventRow.device_id == device.id)
            .order_by(DeviceEventRow.id.desc())
            .limit(q.limit)
        )
        events = []
        for message_id, kind, event, at, received_at, raw in rows:
            details = show_object(raw, FREEFORM_BOUNDS, "details")
            events.append(
                DeviceEventView(
                    message_id=message_id,
                    kind=kind,
                    event=event,
                    at=at,
                    received_at=received_at,
                    details=details.value,
                    details_omitted=details.omitted,
                )
            )
    return answer(DeviceEventList(events=events))


async def create_provisioning_token(request: web.Request) -> web.StreamResponse:
    b = body(request, ProvisioningTokenRequest)
    async with request.app[SERVER].db.session() as session:
        token = await registry.create_provisioning_token(
            session,
            actor=request[PRINCIPAL].actor,
            hardware_id=b.hardware_id,
            tags=b.tags,
            uses=b.uses,
            ttl=timedelta(seconds=b.ttl_s),
        )
        token_id = token.partition(".")[0]
        row = await session.get(ProvisioningToken, token_id)
        assert row is not None  # created just above, in this transaction
        created = ProvisioningTokenCreated(
            id=token_id,
            token=token,
            hardware_id=row.hardware_id,
            tags=list(row.tags),
            uses=row.uses_left,
            expires_at=row.expires_at,
        )
    return answer(created, 201)


# -- assignments ---------------------------------------------------------------


async def create_assignment(request: web.Request) -> web.StreamResponse:
    b = body(request, AssignmentRequest)
    server = request.app[SERVER]
    async with server.db.session() as session:
        release = await find_release(session, b.release)
        view = release_view(release)
    # Its own transaction, committed before anything is signed.
    assigned = await server.assignments.assign(
        server.db,
        target_path=release.target_path,
        actor=request[PRINCIPAL].actor,
        device_ids=list(dict.fromkeys(b.devices)),
        tag=b.tag,
    )
    results = assigned.results
    try:
        await server.assignments.announce(release, results)
    except Exception:
        log.exception("assignment of %s committed but not announced", release.target_path)
    return answer(
        AssignmentResult(
            release=view,
            rule=rule_label(assigned.rule_id) if assigned.rule_id is not None else None,
            assignments=[
                AssignmentView(
                    device_id=r.device_id,
                    target_path=r.target_path,
                    director_version=r.director_version,
                )
                for r in results
            ],
        ),
        201,
    )


async def get_director_root(request: web.Request) -> web.StreamResponse:
    director = request.app[SERVER].assignments.director
    try:
        root = director.trusted_root_path.read_bytes()
    except FileNotFoundError:
        raise ApiError(404, "the director has no root yet; start the server once") from None
    return web.Response(body=root, content_type="application/json")


# -- device and release lifecycle ---------------------------------------------------


async def decommission_device(request: web.Request) -> web.StreamResponse:
    b = body(request, DecommissionRequest)
    server = request.app[SERVER]
    device = await lifecycle.decommission(
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
    async with request.app[SERVER].db.session() as session:
        device, password = await registry.rotate_credentials(
            session, request.match_info["device_id"], actor=request[PRINCIPAL].actor
        )
        view = device_view(device)
    request.app[DEVICE_AUTH].forget(device.id)
    return answer(_credentials(request, device.id, password, view))


# -- assignment rules, listing and cancelling ------------------------------------


async def _apply_tag_rules(
    request: web.Request,
    session: AsyncSession,
    device: Device,
    gained: Collection[str],
    actor: str,
) -> tuple[Release, Recorded] | None:
    """In the caller's transaction: what the tag rules assign to a device that gained tags."""
    result = await request.app[SERVER].assignments.apply_rules(session, device, gained, actor)
    if result is None:
        return None
    release = await session.get(Release, result.target_path)
    assert release is not None  # the assignment was just recorded against it
    return release, result


async def _sign_ruled(request: web.Request, ruled: tuple[Release, Recorded] | None) -> None:
    """After the commit: sign and announce what a tag rule assigned (failures are retried)."""
    if ruled is None:
        return
    release, result = ruled
    server = request.app[SERVER]
    try:
        await server.assignments.sync(server.db, [result.device_id])
        # A device registered just now had no director metadata when the version was chosen:
        # the sync signed above the empty one its registration made, and recorded that.
        async with server.db.session() as session:
            version = await session.scalar(
                select(Device.director_version).where(Device.id == result.device_id)
            )
        await server.assignments.announce(
            release, [replace(result, director_version=version or result.director_version)]
        )
    except Exception:
        log.exception("tag rule assignment of %s committed but not signed", result.device_id)


async def _with_refusals(session: AsyncSession, device: Device, view: DeviceView) -> DeviceView:
    """``view`` with the device's latest refusals, and a warning if it refused its assignment."""
    refusals = await recent_refusals(session, device.id)
    warning = None
    if device.assigned_target is not None and refusals:
        release = await session.get(Release, device.assigned_target)
        current = await current_assignment(session, device.id)
        if release is not None and current is not None and current.cancelled_at is None:
            refused = refusal_of(refusals, release, current.assigned_at)
            if refused is not None:
                warning = refusal_warning(device.id, release, refused)
    return view.model_copy(
        update={
            "refusals": [
                DeviceRefusal(
                    at=r.at,
                    received_at=r.received_at,
                    event=r.event,
                    reason=r.reason,
                    bundle=r.bundle,
                    message=r.message,
                )
                for r in refusals
            ],
            "assignment_warning": warning,
        }
    )


async def list_assignments(request: web.Request) -> web.StreamResponse:
    q = query(request, AssignmentQuery)
    async with request.app[SERVER].db.session() as session:
        releases = {r.target_path: r for r in (await session.scalars(select(Release))).all()}
        devices = {d.id: d for d in await registry.list_devices(session)}
        if q.device is not None and q.device not in devices:
            raise ApiError(404, f"no device {q.device}")
        rows = [
            a
            for a in await current_assignments(session)
            if (q.cancelled or (a.cancelled_at is None and devices[a.device_id].assigned_target))
        ]
        rule_query = select(AssignmentRule).order_by(AssignmentRule.id)
        if not q.cancelled:
            rule_query = rule_query.where(AssignmentRule.cancelled_at.is_(None))
        rules = list((await session.scalars(rule_query)).all())
    holding: dict[int, int] = {}
    for a in rows:
        if a.rule_id is not None and a.cancelled_at is None:
            holding[a.rule_id] = holding.get(a.rule_id, 0) + 1
    tags_of = {d.id: set(d.tags or []) for d in devices.values()}
    items: list[AssignmentItem] = []
    for rule in rules:
        if q.device is not None and rule.tag not in tags_of[q.device]:
            continue
        if q.tag is not None and rule.tag != q.tag:
            continue
        items.append(_assignment_item(rule, releases[rule.target_path], holding.get(rule.id, 0)))
    for a in rows:
        if q.device is not None and a.device_id != q.device:
            continue
        if q.tag is not None and q.tag not in tags_of[a.device_id]:
            continue
        items.append(_assignment_item(a, releases[a.target_path], None))
    if q.name is not None:
        items = [i for i in items if i.name == q.name]
    return answer(AssignmentList(assignments=items))


def _assignment_item(
    row: Assignment | AssignmentRule, release: Release, devices: int | None
) -> AssignmentItem:
    common: dict[str, Any] = {
        "target_path": release.target_path,
        "name": release.name,
        "version": release.version,
        "release_counter": release.release_counter,
        "actor": row.actor,
        "cancelled_at": row.cancelled_at,
        "cancelled_by": row.cancelled_by,
    }
    if isinstance(row, AssignmentRule):
        return AssignmentItem(
            id=rule_label(row.id),
            kind="tag",
            tag=row.tag,
            assigned_at=row.created_at,
            devices=devices,
            **common,
        )
    return AssignmentItem(
        id=f"dev-{row.id}",
        kind="device",
        device_id=row.device_id,
        rule=rule_label(row.rule_id) if row.rule_id is not None else None,
        assigned_at=row.assigned_at,
        **common,
    )


async def cancel_assignment(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    cancelled = await server.assignments.cancel(
        server.db, request.match_info["assignment_id"], request[PRINCIPAL].actor
    )
    try:
        await server.assignments.announce_cancelled(cancelled.versions)
    except Exception:
        log.exception("cancel of %s committed but not announced", cancelled.assignment_id)
    return answer(
        AssignmentCancelled(
            id=cancelled.assignment_id,
            target_path=cancelled.target_path,
            devices=cancelled.devices,
        )
    )


# -- tokens --------------------------------------------------------------------


async def create_api_token(request: web.Request) -> web.StreamResponse:
    b = body(request, TokenRequest)
    async with request.app[SERVER].db.session() as session:
        row, bearer = await create_token(
            session, name=b.name, role=b.role, actor=request[PRINCIPAL].actor
        )
        return answer(TokenCreated(token=bearer, info=token_view(row)), 201)


async def list_api_tokens(request: web.Request) -> web.StreamResponse:
    async with request.app[SERVER].db.session() as session:
        return answer(TokenList(tokens=[token_view(t) for t in await list_tokens(session)]))


async def revoke_api_token(request: web.Request) -> web.StreamResponse:
    async with request.app[SERVER].db.session() as session:
        row = await revoke_token(
            session, request.match_info["token_id"], actor=request[PRINCIPAL].actor
        )
        return answer(token_view(row))


# -- the table -----------------------------------------------------------------

_AUTH_ERRORS = (401, 403)
V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/healthz", health, "health", "Is the server up, its database reachable",
        tag="meta", auth="public", response=Health, errors=(503,),
    ),
    Operation(
        "GET", f"{V}/devices", list_devices, "listDevices", "List devices",
        tag="devices", auth="viewer", query=DeviceQuery, response=DeviceList,
        errors=(*_AUTH_ERRORS, 422),
    ),
    Operation(
        "POST", f"{V}/devices", register_device, "registerDevice",
        "Pre-register a device; its password is in the answer, only there",
        tag="devices", auth="admin", body=RegisterDevice, response=DeviceCredentials,
        status=201, errors=(400, *_AUTH_ERRORS, 409, 413, 422),
    ),
    Operation(
        "POST", f"{V}/devices/enrol", enrol_device, "enrolDevice",
        "A device enrols itself with a provisioning token (no bearer token)",
        tag="devices", auth="public", body=EnrolDevice, response=DeviceCredentials,
        status=201, errors=(400, 401, 409, 413, 422),
    ),
    Operation(
        "GET", f"{V}/devices/{{device_id}}", get_device, "getDevice", "Show a device",
        tag="devices", auth="viewer", response=DeviceView, errors=(*_AUTH_ERRORS, 404),
    ),
    Operation(
        "PATCH", f"{V}/devices/{{device_id}}/tags", tag_device, "tagDevice",
        "Add and remove a device's tags",
        tag="devices", auth="operator", body=TagChange, response=DeviceView,
        errors=(400, *_AUTH_ERRORS, 404, 413, 422),
    ),
    Operation(
        "GET", f"{V}/devices/{{device_id}}/events", device_events, "listDeviceEvents",
        "A device's reported events, newest first",
        tag="devices", auth="viewer", query=EventQuery, response=DeviceEventList,
        errors=(*_AUTH_ERRORS, 404, 422),
    ),
    Operation(
        "POST", f"{V}/provisioning-tokens", create_provisioning_token,
        "createProvisioningToken", "Create a token devices enrol themselves with",
        tag="devices", auth="admin", body=ProvisioningTokenRequest,
        response=ProvisioningTokenCreated, status=201, errors=(400, *_AUTH_ERRORS, 413, 422),
    ),
    Operation(
        "POST", f"{V}/assignments", create_assignment, "createAssignment",
        "Assign a released bundle to devices or a tag (signed by the director)",
        tag="assignments", auth="operator", body=AssignmentRequest, response=AssignmentResult,
        status=201, errors=(400, *_AUTH_ERRORS, 404, 409, 413, 422),
    ),
    # -- device and release lifecycle
    Operation(
        "POST", f"{V}/devices/{{device_id}}/decommission", decommission_device,
        "decommissionDevice",
        "Decommission a device: its credentials stop working, its assignment is withdrawn, "
        "its history stays; hidden from the device list unless include_decommissioned",
        tag="devices", auth="admin", body=DecommissionRequest, response=DeviceView,
        errors=(400, *_AUTH_ERRORS, 404, 409, 413, 422),
    ),
    Operation(
        "POST", f"{V}/devices/{{device_id}}/credentials", rotate_device_credentials,
        "rotateDeviceCredentials",
        "Give a device a new password (in the answer, only there); the old one stops "
        "working at once",
        tag="devices", auth="admin", response=DeviceCredentials,
        errors=(*_AUTH_ERRORS, 404, 409),
    ),
    Operation(
        "GET", f"{V}/director/root", get_director_root, "getDirectorTrustedRoot",
        "The director's root metadata (TUF root.json) that devices are provisioned with "
        "(agent.toml [director] root)",
        tag="assignments", auth="viewer", errors=(*_AUTH_ERRORS, 404),
    ),
    # -- assignment rules, listing and cancelling
    Operation(
        "GET", f"{V}/assignments", list_assignments, "listAssignments",
        "Current assignments: each device's (dev-N) and the tag rules (tag-N)",
        tag="assignments", auth="viewer", query=AssignmentQuery, response=AssignmentList,
        errors=(*_AUTH_ERRORS, 404, 422),
    ),
    Operation(
        "DELETE", f"{V}/assignments/{{assignment_id}}", cancel_assignment, "cancelAssignment",
        "Cancel a device's assignment or a tag rule; the devices keep what they run",
        tag="assignments", auth="operator", response=AssignmentCancelled,
        errors=(*_AUTH_ERRORS, 404, 409),
    ),
    Operation(
        "GET", f"{V}/tokens", list_api_tokens, "listTokens", "List API tokens",
        tag="tokens", auth="admin", response=TokenList, errors=_AUTH_ERRORS,
    ),
    Operation(
        "POST", f"{V}/tokens", create_api_token, "createToken",
        "Create an API token; the token is in the answer, only there",
        tag="tokens", auth="admin", body=TokenRequest, response=TokenCreated, status=201,
        errors=(400, *_AUTH_ERRORS, 413, 422),
    ),
    Operation(
        "DELETE", f"{V}/tokens/{{token_id}}", revoke_api_token, "revokeToken",
        "Revoke an API token",
        tag="tokens", auth="admin", response=TokenView, errors=(*_AUTH_ERRORS, 404, 409),
    ),
)
# fmt: on
