"""Many rows at once through the database driver, in the session's transaction.

SQLAlchemy works through every parameter set of an ``executemany`` in Python
(``construct_params``, each value's bind processor looked up by name, the
``insertmanyvalues`` batches of a ``RETURNING``): for ingest's batches of
hundreds of rows that costs more than the database's own work. Here a Core
statement is compiled once per dialect to the driver's SQL and the order of its
parameters; rows come as tuples in that order, each column's bind processor is
applied (so the driver gets exactly the values SQLAlchemy would send it), and
the driver's ``executemany`` (asyncpg, aiosqlite) takes them all in one call,
through SQLAlchemy's ``exec_driver_sql``: in the session's transaction, with
the driver's errors raised as SQLAlchemy's (``IntegrityError``, ...) as before.

:func:`insert_returning_keys` inserts rows and returns the keys of those
stored now, in one statement: ``INSERT ... SELECT FROM unnest(...)`` of one
array per column on PostgreSQL, a multi-row ``VALUES`` on SQLite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

# SQLite takes at most 32,766 bound values in a statement.
_SQLITE_MAX_VALUES: Final = 32_766

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Compiled:
    sql: str
    processors: tuple[Processor, ...]  # one per column of the rows, in their order
    order: tuple[int, ...] | None  # the statement's parameters as columns of a row, if not theirs


def _process(rows: Sequence[Sequence[Any]], processors: Sequence[Processor]) -> list[Any]:
    """The rows with each column's bind processor applied (tuples, or ``rows`` unchanged).

    A batch's rows share most of their times (when received, the hour): a time is
    processed once per column and batch, its result reused for an equal time in
    the same zone (and fold).
    """
    active = [(i, p) for i, p in enumerate(processors) if p is not None]
    if not active:
        return list(rows)
    done: dict[tuple[int, datetime, Any, int], Any] = {}
    out = []
    for row in rows:
        values = list(row)
        for i, p in active:
            value = values[i]
            if type(value) is datetime:
                key = (i, value, value.tzinfo, value.fold)
                processed = done.get(key, done)
                if processed is done:
                    processed = done[key] = p(value)
                values[i] = processed
            else:
                values[i] = p(value)
        out.append(tuple(values))
    return out


class BulkStatement:
    """A Core statement run for many rows given as tuples of ``columns`` (its bind names)."""

    def __init__(self, statement: Any, columns: Sequence[str]) -> None:
        self.statement = statement
        self.columns = tuple(columns)
        self._compiled: dict[str, _Compiled] = {}

    def compiled(self, dialect: Dialect) -> _Compiled:
        """The statement compiled for ``dialect`` (once), its parameters in the rows' order."""
        done = self._compiled.get(dialect.name)
        if done is None:
            compiled: Any = self.statement.compile(dialect=dialect, column_keys=list(self.columns))
            order = list(compiled.positiontup)
            if sorted(order) != sorted(self.columns):
                raise ValueError(f"the statement binds {order}, not the columns {self.columns}")
            binds = compiled.binds
            processors = {
                name: binds[name].type._cached_bind_processor(dialect) for name in self.columns
            }
            position = {name: i for i, name in enumerate(self.columns)}
            done = _Compiled(
                compiled.string,
                tuple(processors[n] for n in self.columns),
                None if order == list(self.columns) else tuple(position[n] for n in order),
            )
            self._compiled[dialect.name] = done
        return done

    async def execute(self, session: AsyncSession, rows: Sequence[Sequence[Any]]) -> None:
        """Run the statement once per row, in the session's transaction."""
        if not rows:
            return
        connection = await session.connection()
        compiled = self.compiled(connection.dialect)
        values = _process(rows, compiled.processors)
        if compiled.order is not None:
            values = [tuple([row[i] for i in compiled.order]) for row in values]
        await connection.exec_driver_sql(compiled.sql, values)


class InsertReturningKeys:
    """``INSERT ... ON CONFLICT (key) DO NOTHING RETURNING key`` of rows given as tuples."""

    def __init__(self, table: Table, columns: Sequence[str], key: str) -> None:
        self.table = table
        self.columns = tuple(columns)
        self.key = key
        self._prepared: dict[str, tuple[str, tuple[Processor, ...]]] = {}

    def _for(self, dialect: Dialect) -> tuple[str, tuple[Processor, ...]]:
        done = self._prepared.get(dialect.name)
        if done is None:
            quote = dialect.identifier_preparer.quote
            table = dialect.identifier_preparer.format_table(self.table)
            names = ", ".join(quote(c) for c in self.columns)
            key = quote(self.key)
            columns = [self.table.c[c] for c in self.columns]
            processors = tuple(c.type._cached_bind_processor(dialect) for c in columns)
            if dialect.name == "postgresql":
                arrays = ", ".join(
                    f"${i}::{c.type.compile(dialect=dialect)}[]" for i, c in enumerate(columns, 1)
                )
                sql = (
                    f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) "
                    f"ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
                )
            else:
                # Completed per call with as many rows of placeholders as it has.
                sql = f"INSERT INTO {table} ({names}) VALUES "
            done = (sql, processors)
            self._prepared[dialect.name] = done
        return done

    async def execute(self, session: AsyncSession, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """Insert ``rows`` (in their order); the keys of the rows stored now."""
        if not rows:
            return []
        connection = await session.connection()
        dialect = connection.dialect
        sql, processors = self._for(dialect)
        values = _process(rows, processors)
        if dialect.name == "postgresql":
            arrays = tuple(list(column) for column in zip(*values, strict=True))
            return [r[0] for r in await connection.exec_driver_sql(sql, arrays)]
        width = len(self.columns)
        per_statement = _SQLITE_MAX_VALUES // width
        placeholder = "(" + ", ".join("?" * width) + ")"
        key = dialect.identifier_preparer.quote(self.key)
        stored: list[Any] = []
        for start in range(0, len(values), per_statement):
            chunk = values[start : start + per_statement]
            statement = (
                sql
                + ", ".join([placeholder] * len(chunk))
                + f" ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
            )
            flat = tuple(v for row in chunk for v in row)
            stored.extend(r[0] for r in await connection.exec_driver_sql(statement, flat))
        return stored
