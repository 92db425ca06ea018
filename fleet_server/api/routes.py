"""The REST operations no feature folder holds yet: the health check and API tokens.

Each feature contributes its own operations (``fleet_server/<feature>/routes.py``:
devices, assignments, published releases, audit, labels, drift); the
application puts them all in one table in the published document's order
(:mod:`fleet_server.api.app`).
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from sqlalchemy import text

from fleet_server.api.errors import ApiError
from fleet_server.api.operations import (
    AUTH_ERRORS,
    PRINCIPAL,
    SERVER,
    Operation,
    answer,
    body,
)
from fleet_server.auth import create_token, list_tokens, revoke_token
from fleet_server.db.models import (
    ApiToken,
)
from protocol.api.base import API_PREFIX, Health
from protocol.api.tokens import TokenCreated, TokenList, TokenRequest, TokenView

log = logging.getLogger(__name__)

_VERSIONED_METADATA = re.compile(r"metadata/\d+\.[a-z]+\.json")


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

V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/healthz", health, "health", "Is the server up, its database reachable",
        tag="meta", auth="public", response=Health, errors=(503,),
    ),
    Operation(
        "GET", f"{V}/tokens", list_api_tokens, "listTokens", "List API tokens",
        tag="tokens", auth="admin", response=TokenList, errors=AUTH_ERRORS,
    ),
    Operation(
        "POST", f"{V}/tokens", create_api_token, "createToken",
        "Create an API token; the token is in the answer, only there",
        tag="tokens", auth="admin", body=TokenRequest, response=TokenCreated, status=201,
        errors=(400, *AUTH_ERRORS, 413, 422),
    ),
    Operation(
        "DELETE", f"{V}/tokens/{{token_id}}", revoke_api_token, "revokeToken",
        "Revoke an API token",
        tag="tokens", auth="admin", response=TokenView, errors=(*AUTH_ERRORS, 404, 409),
    ),
)
# fmt: on
