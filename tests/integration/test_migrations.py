"""The migrations build exactly the schema the models describe, and step back down cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from fleet_server.db.engine import MIGRATIONS, migrate, normalise_url
from fleet_server.db.models import Base
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration


def _inspect(url: str) -> tuple[list[Any], set[str]]:
    """The differences between the database and the models, and the database's tables."""

    async def run() -> tuple[list[Any], set[str]]:
        engine = create_async_engine(normalise_url(url))
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda c: (
                        compare_metadata(MigrationContext.configure(c), Base.metadata),
                        set(inspect(c).get_table_names()),
                    )
                )
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.mark.parametrize("kind", DATABASES)
def test_migrations_match_the_models_and_downgrade_to_nothing(kind: str, tmp_path: Path) -> None:
    with database_url(kind, tmp_path) as url:
        migrate(url)
        differences, tables = _inspect(url)
        assert differences == []
        assert {t.name for t in Base.metadata.sorted_tables} <= tables
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("sqlalchemy.url", normalise_url(url))
        command.downgrade(config, "base")
        _, tables = _inspect(url)
        assert tables <= {"alembic_version"}
        migrate(url)  # and up again
        assert _inspect(url)[0] == []
