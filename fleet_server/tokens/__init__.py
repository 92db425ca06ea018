"""Operators' bearer tokens with roles: viewer < operator < admin.

A token is ``ID.SECRET``; only the SHA-256 of the secret is stored (a 192-bit
random secret needs no slow hash), so a database dump reveals no usable
token. Viewers read; operators also release and assign; admins also manage
devices and tokens. Creating and revoking a token are audited, and the last
admin token cannot be revoked.

A server that starts with no token at all creates one admin token and writes
it to ``DATA_DIR/admin.token`` (mode 0600): the way in for the first admin.

The rules are in :mod:`.rules` (pure), the table in :mod:`.store`, the
operations in :mod:`.service` and the REST operations, which only call the
service, in :mod:`.routes`.
"""

from fleet_server.tokens.rules import (
    InvalidToken,
    LastAdminToken,
    Principal,
    RoleTooLow,
    TokenError,
    TokenNotFound,
    TokenRevoked,
)
from fleet_server.tokens.service import authenticate, bootstrap_admin_token

__all__ = [
    "InvalidToken",
    "LastAdminToken",
    "Principal",
    "RoleTooLow",
    "TokenError",
    "TokenNotFound",
    "TokenRevoked",
    "authenticate",
    "bootstrap_admin_token",
]
