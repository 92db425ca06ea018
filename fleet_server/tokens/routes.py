"""The tokens feature's REST operations: list, create and revoke API tokens.

Each handler parses nothing itself (its :class:`Operation` declares the body)
and calls :mod:`fleet_server.tokens.service`.
"""

from __future__ import annotations

from aiohttp import web

from fleet_server.api.operations import AUTH_ERRORS, PRINCIPAL, SERVER, Operation, answer, body
from fleet_server.tokens import service
from protocol.api.base import API_PREFIX
from protocol.api.tokens import TokenCreated, TokenList, TokenRequest, TokenView


async def create_api_token(request: web.Request) -> web.StreamResponse:
    b = body(request, TokenRequest)
    created = await service.create_token(
        request.app[SERVER].db, name=b.name, role=b.role, actor=request[PRINCIPAL].actor
    )
    return answer(created, 201)


async def list_api_tokens(request: web.Request) -> web.StreamResponse:
    return answer(await service.list_tokens(request.app[SERVER].db))


async def revoke_api_token(request: web.Request) -> web.StreamResponse:
    revoked = await service.revoke_token(
        request.app[SERVER].db, request.match_info["token_id"], actor=request[PRINCIPAL].actor
    )
    return answer(revoked)


V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
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
