"""The fleet server's database: SQLAlchemy 2 (async) models and Alembic migrations."""

from fleet_server.db.engine import Database, migrate

__all__ = ["Database", "migrate"]
