"""The database: engine, sessions and migrations for SQLite (WAL) and PostgreSQL (asyncpg)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from ..files import private_file
from . import sqlite
from .direct import Direct, DirectPool

#: What begin() and begin_read() yield; queries.run() runs prepared statements on either.
TransactionConnection = AsyncConnection | Direct

MIGRATIONS = Path(__file__).parent / "migrations"
READONLY = "parlour_readonly"
#: Advisory lock id held while migrating PostgreSQL ("parlour" in ASCII).
MIGRATION_LOCK = 0x7061726C6F7572


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at parlour's bundled migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook choose the transaction mode instead of the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # The write lock's owner checkpoints on a worker thread (see store/sqlite.py).
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    # No busy_timeout: its handler sleeps on the event loop's thread. A busy database is
    # waited for asynchronously instead (parlour/store/sqlite.py).
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front: two transactions that read and then
    # write can otherwise deadlock, and SQLite answers that with an error, not a wait.
    # Read-only sessions (Database.read) begin DEFERRED and never block writers in WAL.
    readonly = conn.get_execution_options().get(READONLY, False)
    conn.exec_driver_sql("BEGIN" if readonly else sqlite.BEGIN_WRITE)


class Database:
    """Owns the async engine and session factory for one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        database = parsed.database if self.is_sqlite else None
        on_file = bool(database) and database != ":memory:"
        #: This process's SQLite write lock (and the checkpoints of a file's log).
        self.gate = sqlite.WriteGate(database if on_file else None)
        if self.is_sqlite:
            if database and on_file:
                private_file(Path(database))
            # Statements run on the event loop's thread; this process's write
            # transactions take turns on one lock instead of SQLite's busy handler.
            kwargs["async_creator"] = sqlite.connector(database or ":memory:", self.gate)
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True, pool_recycle=1800)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        #: SQLite file only: connections of its own for begin() (see store/direct.py).
        self.direct = (
            DirectPool(database, dialect=self.engine.dialect, gate=self.gate, setup=_sqlite_pragmas)
            if database and on_file
            else None
        )
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.read_engine = self.engine.execution_options(**{READONLY: True})
        self.read_sessions = async_sessionmaker(self.read_engine, expire_on_commit=False)
        #: Bumped when this process creates or revokes an API key, so that remembered
        #: answers about keys are dropped at once.
        self.key_changes = 0

    def session(self) -> AsyncSession:
        """A new session; use as `async with db.session() as s, s.begin(): ...`."""
        return self.sessions()

    def read(self) -> AsyncSession:
        """A session for reads only: on SQLite it does not take the write lock."""
        return self.read_sessions()

    def begin(self) -> AbstractAsyncContextManager[TransactionConnection]:
        """A connection in a write transaction, committed when the block ends, for the Core
        statements every turn runs (queries.run); on a SQLite file, a direct connection."""
        if self.direct is not None:
            return self.direct.transaction(write=True)
        return self.engine.begin()

    def begin_read(self) -> AbstractAsyncContextManager[TransactionConnection]:
        """Like begin(), for reads only (no write lock on SQLite)."""
        if self.direct is not None:
            return self.direct.transaction(write=False)
        return self.read_engine.begin()

    async def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        cfg = alembic_config(self.url)

        def upgrade(connection: Connection) -> None:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

        async with self.engine.begin() as conn:
            if not self.is_sqlite:
                # Several processes may start at once: one migrates, the others wait
                # and then find the schema current.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            await conn.run_sync(upgrade)

    async def close(self) -> None:
        """Dispose of every pooled connection."""
        await self.gate.close()
        await self.engine.dispose()
        if self.direct is not None:
            self.direct.close()
