"""The databases integration tests run against: a SQLite file, and a fresh PostgreSQL database.

PostgreSQL is the one at 127.0.0.1:5432 (trust auth, user ``postgres``), or the
server ``EDGEFLEET_TEST_POSTGRES`` names. Each use gets a database of its own,
created empty and dropped afterwards. An unreachable PostgreSQL is a test
failure, not a skip: CI must not pass by testing less.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

DATABASES = ("sqlite", "postgresql")
POSTGRES_SERVER = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


async def _admin(statement: str) -> None:
    try:
        connection = await asyncpg.connect(f"{POSTGRES_SERVER}/test", timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise AssertionError(
            f"PostgreSQL at {POSTGRES_SERVER} is unreachable ({exc}); these tests need it"
        ) from exc
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped on exit."""
    name = f"edgefleet_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def database_url(kind: str, directory: Path) -> Iterator[str]:
    """A URL of an empty database of ``kind`` (``sqlite`` in ``directory``, or ``postgresql``)."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'fleet.db'}"
    elif kind == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        raise ValueError(f"unknown database kind {kind!r}")
