"""What differs between the two databases the server runs on, asked of a session."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession


def on_postgres(session: AsyncSession) -> bool:
    """Whether ``session`` talks to PostgreSQL (else SQLite)."""
    return session.bind is not None and session.bind.dialect.name == "postgresql"


def insert_for(postgres: bool) -> Any:
    """The ``insert`` of PostgreSQL or SQLite, with its ``ON CONFLICT`` clauses."""
    return pg_insert if postgres else sqlite_insert


def dialect_insert(session: AsyncSession) -> Any:
    """The ``insert`` of ``session``'s database."""
    return insert_for(on_postgres(session))


# On SQLite: an UPDATE that changes no row still begins the transaction with the database's
# write lock (the table exists in every database the server migrated).
TAKE_WRITE_LOCK = text("UPDATE alembic_version SET version_num = version_num WHERE 0")


async def serialise_on(session: AsyncSession, lock_id: int) -> None:
    """Be the only transaction past this point until this one ends: PostgreSQL's advisory
    lock ``lock_id`` (across replicas); SQLite's write lock (it has one writer at a time)."""
    if on_postgres(session):
        await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
    else:
        await session.execute(TAKE_WRITE_LOCK)
