"""What differs between the two databases the server runs on, asked of a session."""

from __future__ import annotations

from typing import Any

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
