"""Who is calling: operators by bearer token, devices by HTTP Basic credentials.

Operator tokens are looked up on every request, so a revoked token stops at
once. Device credentials are checked against the registry and a success is
remembered for a short while: a device refreshing its metadata and
downloading a bundle makes many requests in a row, and each would otherwise
cost a database query.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import TYPE_CHECKING

from aiohttp import web

from fleet_server.api.errors import ApiError
from fleet_server.devices.store import authenticate_device, secret_hash
from fleet_server.tokens import InvalidToken, Principal, authenticate
from protocol.api.tokens import Role
from protocol.topics import DEVICE_ID_PATTERN

if TYPE_CHECKING:
    from fleet_server.server import FleetServer

BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgefleet"'}
BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="edgefleet devices", charset="UTF-8"'}


async def authenticate_operator(server: FleetServer, request: web.Request, need: Role) -> Principal:
    """The caller of an operator route, who must hold at least role ``need``."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise ApiError(
            401, "this needs a bearer token (Authorization: Bearer ID.SECRET)", BEARER_CHALLENGE
        )
    try:
        principal = await authenticate(server.db, value)
    except InvalidToken as exc:
        raise ApiError(401, str(exc), BEARER_CHALLENGE) from None
    principal.require(need)
    return principal


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    # Checked before any lookup: what reaches the database is a well-formed id.
    if not sep or not DEVICE_ID_PATTERN.fullmatch(user) or len(password) > 256:
        return None
    return user, password


class DeviceAuthenticator:
    """Checks device credentials, remembering successes for ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float = 30.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._valid_until: dict[tuple[str, str], float] = {}

    async def device(self, server: FleetServer, request: web.Request) -> str:
        """The id of the device making ``request``; 401 unless its credentials are right."""
        credentials = _basic_credentials(request.headers.get("Authorization", ""))
        if credentials is None:
            raise ApiError(
                401, "devices authenticate with HTTP Basic (device id, password)", BASIC_CHALLENGE
            )
        device_id, password = credentials
        # Only a digest of the password is kept in memory.
        key = (device_id, secret_hash(password))
        now = time.monotonic()
        if self._valid_until.get(key, 0.0) > now:
            return device_id
        async with server.db.session() as session:
            valid = await authenticate_device(session, device_id, password)
        if not valid:
            self._valid_until.pop(key, None)
            raise ApiError(401, "unknown device or wrong password", BASIC_CHALLENGE)
        if len(self._valid_until) >= self.max_entries:
            self._valid_until = {k: v for k, v in self._valid_until.items() if v > now}
            if len(self._valid_until) >= self.max_entries:
                self._valid_until.clear()
        self._valid_until[key] = now + self.ttl_s
        return device_id

    def forget(self, device_id: str) -> None:
        """Drop remembered successes of one device (its credentials changed)."""
        for key in [k for k in self._valid_until if k[0] == device_id]:
            del self._valid_until[key]
