"""The assignments feature's REST operations: assign, list, cancel, yank, the director's root.

Each handler parses nothing itself (its :class:`Operation` declares the query
and body) and calls the service (:mod:`fleet_server.assignments.service`,
:mod:`fleet_server.assignments.withdrawal`). What must follow the commit
(announcing over MQTT) runs after it, and its failure is logged without
undoing what was committed: the device finds its assignment at its next poll.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from fleet_server.api.errors import ApiError
from fleet_server.api.operations import (
    AUTH_ERRORS,
    PRINCIPAL,
    SERVER,
    Operation,
    answer,
    body,
    query,
)
from fleet_server.assignments import withdrawal
from fleet_server.assignments.listing import find_release, list_current
from fleet_server.assignments.planner import rule_label
from fleet_server.db.models import Assignment, AssignmentRule, Release
from fleet_server.published.routes import release_view
from protocol.api.assignments import (
    AssignmentCancelled,
    AssignmentItem,
    AssignmentList,
    AssignmentQuery,
    AssignmentRequest,
    AssignmentResult,
    AssignmentView,
)
from protocol.api.base import API_PREFIX
from protocol.api.releases import YankRequest, YankResult

log = logging.getLogger(__name__)


async def create_assignment(request: web.Request) -> web.StreamResponse:
    b = body(request, AssignmentRequest)
    server = request.app[SERVER]
    release = await find_release(server.db, b.release)
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


async def yank_release(request: web.Request) -> web.StreamResponse:
    b = body(request, YankRequest)
    server = request.app[SERVER]
    target_path = (await find_release(server.db, b.release)).target_path
    outcome = await withdrawal.yank(
        server.db, server.assignments, target_path, reason=b.reason, actor=request[PRINCIPAL].actor
    )
    return answer(
        YankResult(
            release=release_view(outcome.release),
            withdrawn=outcome.withdrawn,
            kept=outcome.kept,
            rules_cancelled=outcome.rules_cancelled,
        )
    )


async def list_assignments(request: web.Request) -> web.StreamResponse:
    q = query(request, AssignmentQuery)
    listing = await list_current(request.app[SERVER].db, device=q.device, cancelled=q.cancelled)
    tags_of = listing.tags_of
    items: list[AssignmentItem] = []
    for rule in listing.rules:
        if q.device is not None and rule.tag not in tags_of[q.device]:
            continue
        if q.tag is not None and rule.tag != q.tag:
            continue
        release = listing.releases[rule.target_path]
        items.append(_assignment_item(rule, release, listing.holding.get(rule.id, 0)))
    for a in listing.assignments:
        if q.device is not None and a.device_id != q.device:
            continue
        if q.tag is not None and q.tag not in tags_of[a.device_id]:
            continue
        items.append(_assignment_item(a, listing.releases[a.target_path], None))
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


V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST", f"{V}/assignments", create_assignment, "createAssignment",
        "Assign a released bundle to devices or a tag (signed by the director)",
        tag="assignments", auth="operator", body=AssignmentRequest, response=AssignmentResult,
        status=201, errors=(400, *AUTH_ERRORS, 404, 409, 413, 422),
    ),
    Operation(
        "POST", f"{V}/releases/yank", yank_release, "yankRelease",
        "Yank a release: devices not running it are no longer offered it (their director "
        "metadata names nothing); devices running it keep it. Not a rollback",
        tag="releases", auth="operator", body=YankRequest, response=YankResult,
        errors=(400, *AUTH_ERRORS, 404, 409, 413, 422),
    ),
    Operation(
        "GET", f"{V}/director/root", get_director_root, "getDirectorTrustedRoot",
        "The director's root metadata (TUF root.json) that devices are provisioned with "
        "(agent.toml [director] root)",
        tag="assignments", auth="viewer", errors=(*AUTH_ERRORS, 404),
    ),
    Operation(
        "GET", f"{V}/assignments", list_assignments, "listAssignments",
        "Current assignments: each device's (dev-N) and the tag rules (tag-N)",
        tag="assignments", auth="viewer", query=AssignmentQuery, response=AssignmentList,
        errors=(*AUTH_ERRORS, 404, 422),
    ),
    Operation(
        "DELETE", f"{V}/assignments/{{assignment_id}}", cancel_assignment, "cancelAssignment",
        "Cancel a device's assignment or a tag rule; the devices keep what they run",
        tag="assignments", auth="operator", response=AssignmentCancelled,
        errors=(*AUTH_ERRORS, 404, 409),
    ),
)
# fmt: on
