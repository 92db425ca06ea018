"""Operators' bearer tokens with roles: viewer < operator < admin.

A token is ``ID.SECRET``; only the SHA-256 of the secret is stored (a 192-bit
random secret needs no slow hash), so a database dump reveals no usable
token. Viewers read; operators also release and assign; admins also manage
devices and tokens. Creating and revoking a token are audited.

A server that starts with no token at all creates one admin token and writes
it to ``DATA_DIR/admin.token`` (mode 0600): the way in for the first admin.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit import record
from fleet_server.db import Database
from fleet_server.db.models import ApiToken
from fleet_server.devices.store import new_secret, secret_hash
from fleet_server.errors import Conflict, Forbidden, Invalid, NotFound, Unauthenticated
from protocol.api.tokens import ROLES, Role

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
# Checked before any lookup: what reaches the database is plain ASCII.
_BEARER = re.compile(r"^[A-Za-z0-9_-]{1,32}\.[A-Za-z0-9_-]{1,128}\Z")
_TOKENS_LOCK_ID = 0x6564_6766  # advisory lock: one bootstrap, one last-admin check at a time


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
        if not role_allows(self.role, role):
            raise RoleTooLow(f"this needs the {role} role; the token {self.name!r} is {self.role}")


async def create_token(
    session: AsyncSession, *, name: str, role: Role, actor: str
) -> tuple[ApiToken, str]:
    """Create a token; returns it and its bearer value (shown only now)."""
    if role not in ROLES:
        raise TokenError(f"role must be one of {', '.join(ROLES)}")
    token_id = secrets.token_hex(8)
    secret = new_secret()
    row = ApiToken(
        id=token_id,
        name=name,
        role=role,
        secret_hash=secret_hash(secret),
        created_at=datetime.now(UTC),
        revoked_at=None,
    )
    session.add(row)
    await session.flush()
    await record(session, actor, "token.create", token_id, {"name": name, "role": role})
    return row, f"{token_id}.{secret}"


async def _lock_tokens(session: AsyncSession) -> None:
    """Serialise token-table decisions across replicas (SQLite has a single writer anyway)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _TOKENS_LOCK_ID})


async def list_tokens(session: AsyncSession) -> list[ApiToken]:
    return list((await session.scalars(select(ApiToken).order_by(ApiToken.created_at))).all())


async def revoke_token(session: AsyncSession, token_id: str, *, actor: str) -> ApiToken:
    """Revoke a token at once; it is kept (revoked) so the audit log's names stay meaningful."""
    row = await session.get(ApiToken, token_id, with_for_update=True)
    if row is None:
        raise TokenNotFound(f"no token {token_id}")
    if row.revoked_at is not None:
        raise TokenRevoked(f"token {token_id} is already revoked")
    if row.role == "admin":
        await _lock_tokens(session)
        admins = await session.scalar(
            select(func.count())
            .select_from(ApiToken)
            .where(ApiToken.role == "admin", ApiToken.revoked_at.is_(None))
        )
        if (admins or 0) <= 1:
            # Nobody could manage tokens any more, and the bootstrap runs only on an empty table.
            raise LastAdminToken(f"token {token_id} is the last admin token; create another first")
    row.revoked_at = datetime.now(UTC)
    await record(session, actor, "token.revoke", token_id, {"name": row.name, "role": row.role})
    return row


async def authenticate(session: AsyncSession, bearer: str) -> Principal:
    """The caller a bearer token names; :class:`InvalidToken` if unknown or revoked."""
    if not _BEARER.match(bearer):
        raise InvalidToken("the bearer token is malformed; expected ID.SECRET")
    token_id, _, secret = bearer.partition(".")
    row = await session.get(ApiToken, token_id)
    if row is None or not hmac.compare_digest(row.secret_hash, secret_hash(secret)):
        raise InvalidToken("the bearer token is unknown")
    if row.revoked_at is not None:
        raise InvalidToken("the bearer token was revoked")
    return Principal(row.id, row.name, row.role)


async def bootstrap_admin_token(db: Database, data_dir: Path) -> Path | None:
    """If no token exists, create an admin token and write it to ``DATA_DIR/admin.token``.

    Returns the file written, or ``None`` when tokens already exist. Safe to
    call on every start and from several replicas at once. The file is
    written (mode 0600) before the token is committed, so a crash cannot
    leave a token that nobody holds.
    """
    path = data_dir / ADMIN_TOKEN_FILE
    staged = path.with_name(f".{path.name}.tmp")
    async with db.session() as session:
        await _lock_tokens(session)
        if (await session.scalar(select(func.count()).select_from(ApiToken))) or 0:
            return None
        _, bearer = await create_token(
            session, name="bootstrap-admin", role="admin", actor="server:bootstrap"
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        staged.unlink(missing_ok=True)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(bearer + "\n")
            f.flush()
            os.fsync(f.fileno())
    staged.replace(path)
    log.warning("no API token existed: created an admin token in %s", path)
    return path
