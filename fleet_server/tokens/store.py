"""The tokens' table, and the lock that serialises decisions over it."""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.models import ApiToken

_TOKENS_LOCK_ID = 0x6564_6766  # advisory lock: one bootstrap, one last-admin check at a time


async def lock_tokens(session: AsyncSession) -> None:
    """Serialise token-table decisions across replicas (SQLite has a single writer anyway)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _TOKENS_LOCK_ID})


async def get_token(
    session: AsyncSession, token_id: str, *, for_update: bool = False
) -> ApiToken | None:
    """The token ``token_id``, or ``None``."""
    return await session.get(ApiToken, token_id, with_for_update=for_update)


async def all_tokens(session: AsyncSession) -> list[ApiToken]:
    """Every token, revoked ones too, oldest first."""
    return list((await session.scalars(select(ApiToken).order_by(ApiToken.created_at))).all())


async def count_tokens(session: AsyncSession) -> int:
    """How many tokens exist, revoked ones too."""
    return (await session.scalar(select(func.count()).select_from(ApiToken))) or 0


async def count_live_admins(session: AsyncSession) -> int:
    """How many admin tokens are not revoked."""
    admins = await session.scalar(
        select(func.count())
        .select_from(ApiToken)
        .where(ApiToken.role == "admin", ApiToken.revoked_at.is_(None))
    )
    return admins or 0
