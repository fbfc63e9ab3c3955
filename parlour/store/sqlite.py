"""SQLite connections that run statements on the event loop's own thread.

aiosqlite hands every call (cursor, execute, fetch, close: four per statement) to a
worker thread and back. On a busy event loop each hand-off waits for the GIL, so a
turn's dozen statements cost far more in hand-offs than in SQLite, which answers a
WAL-mode statement in microseconds. Running them in place changes two things:

- Nothing may block the loop waiting for a lock. Write transactions of one process
  queue on an asyncio lock (first come, first served) before `BEGIN IMMEDIATE`, and a
  lock held by another process (a CLI command writing) is waited for by polling with
  asyncio sleeps, never with SQLite's own sleeping busy handler.
- A long statement (a large import) holds up the loop while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import aiosqlite

T = TypeVar("T")

#: How long a statement waits for a lock before failing with "database is locked".
LOCK_TIMEOUT_S = 30.0
#: Polling interval while another process holds the lock: doubles up to the maximum.
RETRY_FIRST_S = 0.001
RETRY_MAX_S = 0.05
#: How a write transaction begins (see db.py); the write lock is taken before it.
BEGIN_WRITE = "BEGIN IMMEDIATE"
#: Seconds from a write to the checkpoint of the write-ahead log that copies it.
CHECKPOINT_INTERVAL_S = 0.5

log = logging.getLogger(__name__)


class WriteGate:
    """The write lock shared by every connection of one database in this process, and the
    checkpoints of its write-ahead log.

    Connections do not checkpoint by themselves (`wal_autocheckpoint=0`, see db.py):
    SQLite would do it inside whichever commit crosses 1000 pages, copying pages and
    waiting for fsync on the event loop's thread. Instead, a little after write
    transactions, a worker thread checkpoints without blocking anyone (PASSIVE).
    """

    def __init__(self, database: str | None = None) -> None:
        self.lock = asyncio.Lock()
        self.database = database
        self._dirty = False
        self._checkpoints: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        """Wait for this process's other write transactions to end."""
        try:
            async with asyncio.timeout(LOCK_TIMEOUT_S):
                await self.lock.acquire()
        except TimeoutError:
            raise sqlite3.OperationalError("database is locked") from None

    def release(self) -> None:
        """Let the next write transaction begin; checkpoint what was written soon."""
        self.lock.release()
        if self.database is None:
            return
        self._dirty = True
        if self._checkpoints is None or self._checkpoints.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # closed outside the loop: the next write schedules it
                return
            self._checkpoints = loop.create_task(self._checkpoint_loop())

    async def _checkpoint_loop(self) -> None:
        while self._dirty:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            self._dirty = False
            await asyncio.to_thread(self._checkpoint)

    def _checkpoint(self) -> None:
        assert self.database is not None
        try:
            connection = sqlite3.connect(self.database, timeout=CHECKPOINT_INTERVAL_S)
            try:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                connection.close()
        except sqlite3.Error as exc:  # the next round tries again
            log.debug("checkpoint of %s failed: %s", self.database, exc)
            self._dirty = True

    async def close(self) -> None:
        """Stop checkpointing; the last connection to close checkpoints what is left."""
        task, self._checkpoints = self._checkpoints, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def is_busy(error: sqlite3.OperationalError) -> bool:
    """True when SQLite refused because another connection holds a lock."""
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF == sqlite3.SQLITE_BUSY
    return "database is locked" in str(error)


async def retry_busy(call: Callable[[], T]) -> T:
    """Run `call`, retrying while another process holds a lock it needs."""
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    delay = RETRY_FIRST_S
    while True:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)


class _InlineQueue:
    """Stands in for aiosqlite's queue to its worker thread: runs each call at once."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        if future is not None and not future.done():
            future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection without its worker thread, for SQLAlchemy's aiosqlite dialect."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], gate: WriteGate) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._gate = gate
        self._writing = False
        self._tx = _InlineQueue()  # type: ignore[assignment]

    def __await__(self) -> Any:
        return self._connect().__await__()

    async def _connect(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    async def _execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        call = partial(fn, *args, **kwargs)
        if self._writing:
            # Holding the write lock, nothing this connection does can be refused as busy.
            return call()
        if args and args[0] == BEGIN_WRITE:
            await self._acquire()
            try:
                return await retry_busy(call)
            except BaseException:
                self._release()
                raise
        return await retry_busy(call)

    async def _acquire(self) -> None:
        await self._gate.acquire()
        self._writing = True

    def _release(self) -> None:
        if self._writing:
            self._writing = False
            self._gate.release()

    async def commit(self) -> None:
        try:
            await super().commit()
        finally:
            self._release()

    async def rollback(self) -> None:
        try:
            await super().rollback()
        finally:
            self._release()

    def stop(self) -> asyncio.Future[Any] | None:
        self._running = False
        self._release()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        return None


def connector(database: str, gate: WriteGate) -> Callable[[], Any]:
    """An `async_creator` for SQLAlchemy: inline connections to `database` sharing `gate`."""

    async def connect() -> InlineConnection:
        # timeout=0: a busy database is retried asynchronously, never waited for in place.
        connection = InlineConnection(
            partial(
                sqlite3.connect,
                database,
                timeout=0,
                isolation_level=None,
                check_same_thread=False,
            ),
            gate,
        )
        await connection
        return connection

    return connect
