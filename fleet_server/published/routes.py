"""The published-releases feature's REST operations: list and push releases.

Each handler parses nothing itself (its :class:`Operation` declares the query
and body) and calls the service (:mod:`fleet_server.published.service`). A
yank withdraws assignments, so it is the assignments feature's operation.
"""

from __future__ import annotations

from aiohttp import web
from tuf.api import exceptions as tuf_exc

from fleet_server.api.operations import (
    AUTH_ERRORS,
    PRINCIPAL,
    SERVER,
    Operation,
    answer,
    body,
    query,
)
from fleet_server.db.models import Release
from fleet_server.published import store
from fleet_server.published.rules import ReleaseError, check_push
from protocol.api.base import API_PREFIX
from protocol.api.releases import (
    ReleaseList,
    ReleasePush,
    ReleasePushResult,
    ReleaseQuery,
    ReleaseView,
)

MAX_PUSH_BODY = 512 << 20  # base64 of the pushed files, in JSON


def release_view(r: Release) -> ReleaseView:
    return ReleaseView.model_validate(r, from_attributes=True)


async def list_releases(request: web.Request) -> web.StreamResponse:
    q = query(request, ReleaseQuery)
    async with request.app[SERVER].db.session() as session:
        rows = await store.releases(session, q.name)
        return answer(ReleaseList(releases=[release_view(r) for r in rows]))


async def push_release(request: web.Request) -> web.StreamResponse:
    b = body(request, ReleasePush)
    server = request.app[SERVER]
    files = dict(b.files)
    check_push(server.releases.repository.path, files)
    try:
        async with server.db.session() as session:
            rows = await server.releases.publish(session, files, request[PRINCIPAL].actor)
            published = [release_view(r) for r in rows]
    except (tuf_exc.RepositoryError, ValueError) as exc:
        # Metadata so broken that python-tuf cannot even load it as a trusted root.
        raise ReleaseError(f"the pushed metadata does not verify: {exc}") from None
    result = ReleasePushResult(published=published, files=len(files))
    return answer(result, 201 if published else 200)


V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", f"{V}/releases", list_releases, "listReleases", "List released bundles",
        tag="releases", auth="viewer", query=ReleaseQuery, response=ReleaseList,
        errors=(*AUTH_ERRORS, 422),
    ),
    Operation(
        "POST", f"{V}/releases", push_release, "pushRelease",
        "Push signed image-repository files; published only if they verify",
        tag="releases", auth="operator", body=ReleasePush, response=ReleasePushResult,
        status=201, other_success=(200,), errors=(400, *AUTH_ERRORS, 409, 413, 422),
        body_limit=MAX_PUSH_BODY,
    ),
)
# fmt: on
