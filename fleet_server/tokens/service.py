"""The tokens feature's service: each operation in one transaction, answered as API models."""

from __future__ import annotations

import logging
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit import record
from fleet_server.db import Database
from fleet_server.db.models import ApiToken
from fleet_server.devices.store import new_secret, secret_hash
from fleet_server.tokens import store
from fleet_server.tokens.rules import (
    Principal,
    StoredToken,
    TokenNotFound,
    admit,
    check_revoke,
    check_role,
    parse_bearer,
)
from protocol.api.tokens import Role, TokenCreated, TokenList, TokenView

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"


def token_view(t: ApiToken) -> TokenView:
    """A token as the API shows it (never its secret)."""
    return TokenView.model_validate(t, from_attributes=True)


async def _create(session: AsyncSession, name: str, role: Role, actor: str) -> tuple[ApiToken, str]:
    check_role(role)
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


async def create_token(db: Database, *, name: str, role: Role, actor: str) -> TokenCreated:
    """Create a token; the answer holds its bearer value, shown only now."""
    async with db.session() as session:
        row, bearer = await _create(session, name, role, actor)
        return TokenCreated(token=bearer, info=token_view(row))


async def list_tokens(db: Database) -> TokenList:
    """Every token, revoked ones too, oldest first."""
    async with db.session() as session:
        return TokenList(tokens=[token_view(t) for t in await store.all_tokens(session)])


async def revoke_token(db: Database, token_id: str, *, actor: str) -> TokenView:
    """Revoke a token at once; it is kept (revoked) so the audit log's names stay meaningful."""
    async with db.session() as session:
        row = await store.get_token(session, token_id, for_update=True)
        if row is None:
            raise TokenNotFound(f"no token {token_id}")
        live_admins = 0
        if row.role == "admin" and row.revoked_at is None:
            await store.lock_tokens(session)
            live_admins = await store.count_live_admins(session)
        check_revoke(token_id, row.role, row.revoked_at is not None, live_admins)
        row.revoked_at = datetime.now(UTC)
        await record(session, actor, "token.revoke", token_id, {"name": row.name, "role": row.role})
        return token_view(row)


async def authenticate(db: Database, bearer: str) -> Principal:
    """The caller a bearer token names; :class:`InvalidToken` if malformed, unknown or revoked."""
    token_id, secret = parse_bearer(bearer)
    async with db.session() as session:
        row = await store.get_token(session, token_id)
    held = None
    if row is not None:
        held = StoredToken(row.id, row.name, row.role, row.secret_hash, row.revoked_at is not None)
    return admit(secret_hash(secret), held)


async def bootstrap_admin_token(db: Database, data_dir: Path) -> Path | None:
    """If no token exists, create an admin token in ``DATA_DIR/admin.token``; the file, or ``None``.

    Safe from several replicas at once. The file (mode 0600) is written before
    the token is committed, so a crash cannot leave a token that nobody holds.
    """
    path = data_dir / ADMIN_TOKEN_FILE
    staged = path.with_name(f".{path.name}.tmp")
    async with db.session() as session:
        await store.lock_tokens(session)
        if await store.count_tokens(session):
            return None
        _, bearer = await _create(session, "bootstrap-admin", "admin", "server:bootstrap")
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
