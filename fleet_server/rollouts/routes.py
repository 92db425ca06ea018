"""The rollouts feature's REST operations: create, list, show, and operators' actions.

Each handler parses nothing itself (its :class:`Operation` declares the body)
and calls the service (:mod:`fleet_server.rollouts.service`).
"""

from __future__ import annotations

from aiohttp import web

from fleet_server.api.operations import (
    AUTH_ERRORS,
    PRINCIPAL,
    SERVER,
    Handler,
    Operation,
    answer,
    body,
)
from fleet_server.rollouts import service
from protocol.api.base import API_PREFIX
from protocol.api.rollouts import RolloutAction, RolloutList, RolloutSpec, RolloutView


async def create_rollout(request: web.Request) -> web.StreamResponse:
    spec = body(request, RolloutSpec)
    view = await service.create(request.app[SERVER].db, spec, request[PRINCIPAL].actor)
    return answer(view, 201)


async def list_rollouts(request: web.Request) -> web.StreamResponse:
    return answer(await service.list_all(request.app[SERVER].db))


async def get_rollout(request: web.Request) -> web.StreamResponse:
    return answer(await service.get(request.app[SERVER].db, request.match_info["rollout_id"]))


def _action(name: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        b = body(request, RolloutAction)
        server = request.app[SERVER]
        view = await service.act(
            server.db,
            server.assignments,
            request.match_info["rollout_id"],
            name,
            request[PRINCIPAL].actor,
            b.reason,
        )
        return answer(view)

    handle.__name__ = f"{name}_rollout"
    return handle


V = API_PREFIX
_ACTION_SUMMARIES = {
    "pause": "Pause a rollout: no more installs start until it is resumed",
    "resume": "Resume a paused rollout; its maximum bake counts afresh",
    "promote": "Start a rollout's next stage now, whatever its gates say",
    "abort": "End a rollout; devices keep what they have",
}

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST", f"{V}/rollouts", create_rollout, "createRollout",
        "Start a staged rollout of a release to the devices a selector matches",
        tag="rollouts", auth="operator", body=RolloutSpec, response=RolloutView, status=201,
        errors=(400, *AUTH_ERRORS, 404, 409, 413, 422),
    ),
    Operation(
        "GET", f"{V}/rollouts", list_rollouts, "listRollouts", "Rollouts, newest first",
        tag="rollouts", auth="viewer", response=RolloutList, errors=AUTH_ERRORS,
    ),
    Operation(
        "GET", f"{V}/rollouts/{{rollout_id}}", get_rollout, "getRollout",
        "A rollout: its phase, waves, gates and decisions",
        tag="rollouts", auth="viewer", response=RolloutView, errors=(*AUTH_ERRORS, 404),
    ),
    *(
        Operation(
            "POST", f"{V}/rollouts/{{rollout_id}}/{name}", _action(name),
            f"{name}Rollout", summary,
            tag="rollouts", auth="operator", body=RolloutAction, response=RolloutView,
            errors=(400, *AUTH_ERRORS, 404, 409, 413, 422),
        )
        for name, summary in _ACTION_SUMMARIES.items()
    ),
)
# fmt: on
