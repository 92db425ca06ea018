"""Connecting to the database, and bringing its schema up to date with Alembic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import ORMExecuteState, Session

from fleet_server.db.dialects import TAKE_WRITE_LOCK
from fleet_server.stored_json import load_column

MIGRATIONS = Path(__file__).with_name("migrations")


def normalise_url(url: str) -> str:
    """Accept ``sqlite:///file.db`` and ``postgresql://...`` and pick the async drivers."""
    if url.startswith("sqlite:///") or url.startswith("sqlite://"):
        return url.replace("sqlite://", "sqlite+aiosqlite://", 1)
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


class Database:
    """An async engine and its session factory."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        # A stored JSON value no parser takes (nesting past the recursion limit, say)
        # comes back marked, not raised, so the rows beside it stay readable.
        kwargs: dict[str, Any] = {"json_deserializer": load_column}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        session_class: type[Session] = Session
        if self.url.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            session_class = SqliteSession
        self.sessions = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=session_class
        )

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith("postgresql")

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    async def close(self) -> None:
        await self.engine.dispose()


class SqliteSession(Session):
    """A session on SQLite whose ``SELECT ... FOR UPDATE`` locks, as on PostgreSQL.

    SQLite has no row locks and drops ``FOR UPDATE``; and its driver begins a
    transaction only at the first write, so what a session reads before it
    writes is not held. A read-modify-write such as "the next version above
    the recorded one" could then be made by two sessions from the same read,
    and one of the two updates lost. Here, before a locking read, the session
    writes nothing (:data:`TAKE_WRITE_LOCK`): that begins its transaction with
    the database's write lock, waited for as any write waits, so the read and
    everything after it are the only writer's until the commit.
    """


@event.listens_for(SqliteSession, "do_orm_execute")
def _lock_before_locking_read(state: ORMExecuteState) -> None:
    if state.is_select and getattr(state.statement, "_for_update_arg", None) is not None:
        state.session.execute(TAKE_WRITE_LOCK)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrate(url: str) -> None:
    """Upgrade the database at ``url`` to the newest schema (blocking; not in an event loop)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalise_url(url))
    command.upgrade(config, "head")
