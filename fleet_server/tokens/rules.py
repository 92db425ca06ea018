"""The rules of tokens, over plain data: roles, the bearer's form, who may be revoked."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from fleet_server.errors import Conflict, Forbidden, Invalid, NotFound, Unauthenticated
from protocol.api.tokens import ROLES, Role

# Checked before any lookup: what reaches the database is plain ASCII.
_BEARER = re.compile(r"^[A-Za-z0-9_-]{1,32}\.[A-Za-z0-9_-]{1,128}\Z")


class TokenError(Invalid):
    """A token request cannot be done; the message says why."""


class InvalidToken(Unauthenticated, TokenError):
    """The bearer token is missing, malformed, unknown or expired."""


class RoleTooLow(Forbidden, TokenError):
    """The token's role may not do this."""


class TokenNotFound(NotFound, TokenError):
    """No token goes by that id."""


class TokenRevoked(Conflict, TokenError):
    """The token was revoked before."""


class LastAdminToken(Conflict, TokenError):
    """Revoking it would leave no admin token."""


def role_allows(have: str, need: Role) -> bool:
    """Whether a token of role ``have`` may do what needs ``need``."""
    return have in ROLES and ROLES.index(have) >= ROLES.index(need)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and role."""

    token_id: str
    name: str
    role: str

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"token:{self.token_id}:{self.name}"[:128]

    def require(self, role: Role) -> None:
        """Refuse (:class:`RoleTooLow`) unless this caller's role allows ``role``'s work."""
        if not role_allows(self.role, role):
            raise RoleTooLow(f"this needs the {role} role; the token {self.name!r} is {self.role}")


def check_role(role: str) -> None:
    """Refuse a role that is not one of :data:`protocol.api.tokens.ROLES`."""
    if role not in ROLES:
        raise TokenError(f"role must be one of {', '.join(ROLES)}")


def parse_bearer(bearer: str) -> tuple[str, str]:
    """The token id and secret of ``ID.SECRET``; :class:`InvalidToken` if malformed."""
    if not _BEARER.match(bearer):
        raise InvalidToken("the bearer token is malformed; expected ID.SECRET")
    token_id, _, secret = bearer.partition(".")
    return token_id, secret


@dataclass(frozen=True)
class StoredToken:
    """What the server holds of a token: never its secret, only the secret's digest."""

    id: str
    name: str
    role: str
    secret_hash: str
    revoked: bool


def admit(digest: str, token: StoredToken | None) -> Principal:
    """The holder of ``token`` if ``digest`` is its secret's; else :class:`InvalidToken`.

    ``token`` is ``None`` for an unknown id; a revoked token admits nobody.
    """
    if token is None or not hmac.compare_digest(token.secret_hash, digest):
        raise InvalidToken("the bearer token is unknown")
    if token.revoked:
        raise InvalidToken("the bearer token was revoked")
    return Principal(token.id, token.name, token.role)


def check_revoke(token_id: str, role: str, revoked: bool, live_admins: int) -> None:
    """Refuse revoking a token revoked before, or the last of the ``live_admins`` admin tokens.

    Nobody could manage tokens any more, and the bootstrap runs only on an empty table.
    """
    if revoked:
        raise TokenRevoked(f"token {token_id} is already revoked")
    if role == "admin" and live_admins <= 1:
        raise LastAdminToken(f"token {token_id} is the last admin token; create another first")
