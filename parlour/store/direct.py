"""The statements every turn runs, executed on SQLite directly.

A turn runs about eight small statements in two transactions. Through SQLAlchemy each
costs several times what SQLite itself spends (execution context, events, result
objects, and with the async adapter greenlet switches and trips through the event
loop). On a SQLite file they therefore run on sqlite3 connections of their own:
compiled once by SQLAlchemy for the dialect the rest of parlour uses, converted by the
columns' own types, in transactions that take this process's write lock like every
other write (see sqlite.py). On PostgreSQL the same statements run through SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, cast

from sqlalchemy import Executable
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from .sqlite import BEGIN_WRITE, WriteGate, retry_busy

#: Idle connections kept for the next transactions; more are opened when needed.
MAX_IDLE = 8


class Prepared:
    """A Core statement that every turn runs, compiled once per SQLite dialect.

    Only named bound parameters (`bindparam`) and literal values are supported; an
    INSERT names its columns in `columns` and must be given all of them.
    """

    def __init__(self, statement: Executable, *, columns: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.columns = list(columns) if columns is not None else None
        self._compiled: _Compiled | None = None

    def for_sqlite(self, dialect: Dialect) -> _Compiled:
        """The statement compiled for `dialect` (the same SQLite dialect every time)."""
        if self._compiled is None:
            self._compiled = _Compiled(self, dialect)
        return self._compiled


class _Compiled:
    def __init__(self, prepared: Prepared, dialect: Dialect) -> None:
        statement = cast(ClauseElement, prepared.statement)
        compiled = cast(
            SQLCompiler, statement.compile(dialect=dialect, column_keys=prepared.columns)
        )
        self.sql = str(compiled)
        names = list(compiled.positiontup or ())
        #: (parameter name, or None for a literal; the literal; its conversion) in order.
        self.binds = [
            (
                name if bind.required else None,
                bind.value,
                bind.type.dialect_impl(dialect).bind_processor(dialect),
            )
            for name, bind in ((name, compiled.binds[name]) for name in names)
        ]
        columns = getattr(prepared.statement, "selected_columns", None)
        self.results = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in (columns or ())
        ]
        self.converts_results = any(self.results)

    def run(self, connection: sqlite3.Connection, parameters: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, literal, convert in self.binds:
            value = parameters[name] if name is not None else literal
            values.append(convert(value) if convert is not None else value)
        rows = connection.execute(self.sql, values).fetchall()
        if rows and self.converts_results:
            converts = self.results
            rows = [
                tuple(
                    value if convert is None else convert(value)
                    for convert, value in zip(converts, row, strict=True)
                )
                for row in rows
            ]
        return rows


class Direct:
    """A transaction on one of the pool's sqlite3 connections."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        dialect: Dialect,
        timed: Callable[[float], None] | None = None,
    ) -> None:
        self.connection = connection
        self.dialect = dialect
        self.timed = timed

    def run(self, prepared: Prepared, parameters: Mapping[str, Any]) -> list[Any]:
        """Run a prepared statement now; its rows as converted tuples."""
        if self.timed is None:
            return prepared.for_sqlite(self.dialect).run(self.connection, parameters)
        began = time.perf_counter()
        rows = prepared.for_sqlite(self.dialect).run(self.connection, parameters)
        self.timed(time.perf_counter() - began)
        return rows


class DirectPool:
    """sqlite3 connections to one file, set up like the engine's, for Database.begin()."""

    def __init__(
        self,
        database: str,
        *,
        dialect: Dialect,
        gate: WriteGate,
        setup: Callable[[sqlite3.Connection, Any], None],
    ) -> None:
        self.database = database
        self.dialect = dialect
        self.gate = gate
        self.setup = setup
        self._idle: list[sqlite3.Connection] = []
        #: Told how long each statement took (parlour.ops.metrics sets it).
        self.timed: Callable[[float], None] | None = None

    def _open(self) -> sqlite3.Connection:
        # timeout=0: a busy database is retried asynchronously, never waited for in place.
        connection = sqlite3.connect(
            self.database, timeout=0, isolation_level=None, check_same_thread=False
        )
        self.setup(connection, None)
        return connection

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[Direct]:
        """A transaction committed when the block ends (rolled back on an error).

        A write transaction first takes this process's write lock, which it keeps while
        the block awaits anything.
        """
        if write:
            await self.gate.acquire()
        try:
            connection = self._idle.pop() if self._idle else self._open()
            reusable = False
            try:
                await retry_busy(partial(connection.execute, BEGIN_WRITE if write else "BEGIN"))
                try:
                    yield Direct(connection, self.dialect, self.timed)
                except BaseException:
                    connection.rollback()
                    reusable = True
                    raise
                connection.commit()
                reusable = True
            finally:
                if reusable and len(self._idle) < MAX_IDLE:
                    self._idle.append(connection)
                else:
                    connection.close()
        finally:
            if write:
                self.gate.release()

    def close(self) -> None:
        """Close the idle connections."""
        while self._idle:
            self._idle.pop().close()
