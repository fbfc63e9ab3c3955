"""Per-conversation locks: turns on one conversation run one at a time, others concurrently."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


class KeyedLocks:
    """FIFO asyncio locks created on demand per key and dropped when nobody holds or waits."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Hold the lock for `key` for the duration of the block."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)

    async def close(self) -> None:
        """Nothing to release."""


def advisory_key(key: uuid.UUID) -> int:
    """A signed 64-bit PostgreSQL advisory lock id for a conversation id."""
    return int.from_bytes(key.bytes[:8], "big", signed=True)


class AdvisoryLocks:
    """Per-conversation locks that also hold across processes sharing one PostgreSQL.

    Waiters in this process queue on an in-process lock first, so each process
    holds at most one database connection per busy conversation. The advisory
    lock lives on its own connection (not a transaction), so the turn's short
    write transactions commit normally while the lock stays held; other
    conversations never wait for it.
    """

    def __init__(self, url: str) -> None:
        self.local = KeyedLocks()
        # Autocommit: taking or releasing a lock is one statement, not BEGIN, it, COMMIT.
        self.engine: AsyncEngine = create_async_engine(
            url,
            pool_size=5,
            max_overflow=200,
            pool_pre_ping=True,
            pool_recycle=1800,
            isolation_level="AUTOCOMMIT",
        )

    @asynccontextmanager
    async def hold(self, key: uuid.UUID) -> AsyncIterator[None]:
        """Hold the conversation's lock in this process and in the database."""
        async with self.local.hold(key), self.engine.connect() as conn:
            ident = advisory_key(key)
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ident})
            try:
                yield
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ident})

    async def close(self) -> None:
        """Close the lock connections."""
        await self.engine.dispose()
