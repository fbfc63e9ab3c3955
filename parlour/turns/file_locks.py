"""Per-conversation turn locks that hold across processes sharing one SQLite file.

Two `parlour serve` processes (or `serve` and `parlour chat`) on one data directory must
not interleave two turns of one conversation: both would write the next position. Each
conversation maps to one of a fixed set of lock files beside the database, locked with
flock(2). Waiting polls with asyncio sleeps (as store/sqlite.py waits for SQLite's own
lock), so a waiter never holds a thread and can be cancelled at any moment.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy.engine import make_url

from ..files import FILE_MODE, private_dir
from .locks import AdvisoryLocks, KeyedLocks

#: Lock files per database: conversations that share one merely wait for each other.
SLOTS = 1024
#: Polling interval while another process holds the lock: doubles up to the maximum.
RETRY_FIRST_S = 0.001
RETRY_MAX_S = 0.02


def lock_directory(database: Path) -> Path:
    """Where the lock files of a SQLite database live."""
    return database.with_name(database.name + "-locks")


class FileLocks:
    """FIFO turn locks within this process, flock(2)-held across processes."""

    def __init__(self, directory: Path) -> None:
        self.local = KeyedLocks()
        self.directory = private_dir(directory)

    def _path(self, key: Hashable) -> Path:
        digest = hashlib.blake2b(str(key).encode(), digest_size=8).digest()
        return self.directory / f"{int.from_bytes(digest, 'big') % SLOTS:04d}.lock"

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Hold the conversation's lock in this process and against other processes."""
        async with self.local.hold(key):
            fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                await _lock(fd)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __len__(self) -> int:
        return len(self.local)

    async def close(self) -> None:
        """Nothing to release: every lock is released by the block that took it."""


async def _lock(fd: int) -> None:
    delay = RETRY_FIRST_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)


TurnLocks = KeyedLocks | AdvisoryLocks | FileLocks


def turn_locks(url: str, *, is_sqlite: bool) -> TurnLocks:
    """File locks for a SQLite file (other processes may share it), in-process locks for an
    in-memory SQLite, advisory locks for PostgreSQL."""
    if not is_sqlite:
        return AdvisoryLocks(url)
    database = make_url(url).database
    if not database or database == ":memory:":
        return KeyedLocks()
    return FileLocks(lock_directory(Path(database)))
