"""The labels feature's REST operation: post labels that arrived later.

The handler parses nothing itself (its :class:`Operation` declares the body)
and calls the service (:mod:`fleet_server.labels.service`).
"""

from __future__ import annotations

from aiohttp import web

from fleet_server.api.operations import AUTH_ERRORS, PRINCIPAL, SERVER, Operation, answer, body
from fleet_server.labels.service import post_labels
from protocol.api.base import API_PREFIX
from protocol.api.labels import LabelsRequest, LabelsResult


async def create_labels(request: web.Request) -> web.StreamResponse:
    b = body(request, LabelsRequest)
    async with request.app[SERVER].db.session() as session:
        result = await post_labels(session, b.windows, request[PRINCIPAL].actor)
    return answer(result)


V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST", f"{V}/labels", create_labels, "postLabels",
        "Labels that arrived later: per window, confusion counts or (actual, predicted) pairs",
        tag="drift", auth="operator", body=LabelsRequest, response=LabelsResult,
        errors=(400, *AUTH_ERRORS, 404, 413, 422),
    ),
)
# fmt: on
