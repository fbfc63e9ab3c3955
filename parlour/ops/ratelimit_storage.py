"""A `limits` storage in PostgreSQL, so counters hold across every server process.

`limits` ships storages for memory, Redis, Memcached and MongoDB, none for PostgreSQL. A
fixed window needs only incr/get/get_expiry: one row per key in `rate_limit_counters`,
incremented by one upsert that also starts a new window once the old one has ended.
Times come from the database's clock, so processes on several hosts agree.

The counters use a small asyncpg pool of their own with `synchronous_commit = off`: a
counter's commit does not wait for the disk (a database crash may forget the last
fraction of a second of counts, never corrupt them), and no statement pays for
SQLAlchemy. Measured on this project's machine, SQLAlchemy's pooled autocommit
connections cost 1 to 2 ms of CPU per request for the same statements.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from limits.aio.storage import Storage
from sqlalchemy.engine import make_url

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"
_INCR = (
    "INSERT INTO rate_limit_counters (key, hits, expires_at) "
    f"VALUES ($1, $2, {_NOW} + $3) "
    "ON CONFLICT (key) DO UPDATE SET "
    f"hits = CASE WHEN rate_limit_counters.expires_at <= {_NOW} THEN EXCLUDED.hits "
    "ELSE rate_limit_counters.hits + EXCLUDED.hits END, "
    f"expires_at = CASE WHEN rate_limit_counters.expires_at <= {_NOW} "
    "THEN EXCLUDED.expires_at ELSE rate_limit_counters.expires_at END "
    "RETURNING hits, expires_at"
)
_GET = f"SELECT hits FROM rate_limit_counters WHERE key = $1 AND expires_at > {_NOW}"
_EXPIRY = f"SELECT expires_at FROM rate_limit_counters WHERE key = $1 AND expires_at > {_NOW}"
_CLEAR = "DELETE FROM rate_limit_counters WHERE key = $1"
#: Connections of each process's counter pool.
POOL_SIZE = 8


async def _keep(_connection: Any) -> None:
    """Nothing to reset between uses: every statement is its own transaction. (asyncpg's
    default reset is one more round trip per statement.)"""


class DatabaseStorage(Storage):
    """Fixed-window counters in the `rate_limit_counters` table of a PostgreSQL database."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._pool: asyncio.Future[Any] | None = None

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (asyncpg.PostgresError, OSError)

    async def _connections(self) -> Any:
        """The pool, opened by the first caller while the others wait for it."""
        if self._pool is None:
            self._pool = asyncio.ensure_future(
                asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=POOL_SIZE,
                    server_settings={"synchronous_commit": "off"},
                    reset=_keep,
                )
            )
        return await asyncio.shield(self._pool)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add `amount` to the key's counter (a new window if it expired); the new count."""
        return (await self.incr_window(key, expiry, amount))[0]

    async def incr_window(self, key: str, expiry: int, amount: int = 1) -> tuple[int, float]:
        """Like incr(), with when the window ends (seconds since the epoch) from the same
        statement."""
        pool = await self._connections()
        row = await pool.fetchrow(_INCR, key, amount, float(expiry))
        return int(row[0]), float(row[1])

    async def get(self, key: str) -> int:
        """The key's count in its current window (0 when none is open)."""
        pool = await self._connections()
        return int(await pool.fetchval(_GET, key) or 0)

    async def get_expiry(self, key: str) -> float:
        """When the key's window ends, in seconds since the epoch (now when none is open)."""
        pool = await self._connections()
        value = await pool.fetchval(_EXPIRY, key)
        return float(value) if value is not None else time.time()

    async def check(self) -> bool:
        """True when the database answers."""
        try:
            pool = await self._connections()
            await pool.fetchval("SELECT 1")
        except (asyncpg.PostgresError, OSError):
            return False
        return True

    async def reset(self) -> int | None:
        """Forget every counter; how many there were."""
        pool = await self._connections()
        status: str = await pool.execute("DELETE FROM rate_limit_counters")
        return int(status.split()[-1])

    async def clear(self, key: str) -> None:
        """Forget one key's counter."""
        pool = await self._connections()
        await pool.execute(_CLEAR, key)

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await (await pool).close()
