"""Operator API tokens and their roles."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from protocol.api.base import RequestBody, ResponseBody

TOKEN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")


class TokenRequest(RequestBody):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]
    role: Role


class TokenView(ResponseBody):
    id: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = None


class TokenCreated(ResponseBody):
    """A new bearer token; ``token`` is shown only now."""

    token: str
    info: TokenView


class TokenList(ResponseBody):
    tokens: list[TokenView]
