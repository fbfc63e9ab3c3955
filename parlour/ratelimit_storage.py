"""A `limits` storage in PostgreSQL, so request counters hold across every server process.

`limits` ships storages for memory, Redis, Memcached and MongoDB, none for PostgreSQL. A
fixed window needs only incr/get/get_expiry: one row per key in `rate_limit_counters`,
incremented by one upsert that also starts a new window once the old one has ended.
Times come from the database's clock, so processes on several hosts agree.
"""

from __future__ import annotations

import time

from limits.aio.storage import Storage
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"
_INCR = text(
    "INSERT INTO rate_limit_counters (key, hits, expires_at) "
    f"VALUES (:key, :amount, {_NOW} + :expiry) "
    "ON CONFLICT (key) DO UPDATE SET "
    f"hits = CASE WHEN rate_limit_counters.expires_at <= {_NOW} THEN EXCLUDED.hits "
    "ELSE rate_limit_counters.hits + EXCLUDED.hits END, "
    f"expires_at = CASE WHEN rate_limit_counters.expires_at <= {_NOW} "
    "THEN EXCLUDED.expires_at ELSE rate_limit_counters.expires_at END "
    "RETURNING hits, expires_at"
)
_GET = text(f"SELECT hits FROM rate_limit_counters WHERE key = :key AND expires_at > {_NOW}")
_EXPIRY = text(
    f"SELECT expires_at FROM rate_limit_counters WHERE key = :key AND expires_at > {_NOW}"
)
_CLEAR = text("DELETE FROM rate_limit_counters WHERE key = :key")


class DatabaseStorage(Storage):
    """Fixed-window counters in the `rate_limit_counters` table of a PostgreSQL database."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        # One statement per call, each its own transaction.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return SQLAlchemyError

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add `amount` to the key's counter (a new window if it expired); the new count."""
        return (await self.incr_window(key, expiry, amount))[0]

    async def incr_window(self, key: str, expiry: int, amount: int = 1) -> tuple[int, float]:
        """Like incr(), with when the window ends (seconds since the epoch) from the same
        statement."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                _INCR, {"key": key, "amount": amount, "expiry": float(expiry)}
            )
            hits, ends = result.one()
        return int(hits), float(ends)

    async def get(self, key: str) -> int:
        """The key's count in its current window (0 when none is open)."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(_GET, {"key": key})
        return int(value or 0)

    async def get_expiry(self, key: str) -> float:
        """When the key's window ends, in seconds since the epoch (now when none is open)."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(_EXPIRY, {"key": key})
        return float(value) if value is not None else time.time()

    async def check(self) -> bool:
        """True when the database answers."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    async def reset(self) -> int | None:
        """Forget every counter; how many there were."""
        async with self.engine.connect() as conn:
            result = await conn.execute(text("DELETE FROM rate_limit_counters"))
            return int(result.rowcount)

    async def clear(self, key: str) -> None:
        """Forget one key's counter."""
        async with self.engine.connect() as conn:
            await conn.execute(
                text("DELETE FROM rate_limit_counters WHERE key = :key"), {"key": key}
            )
