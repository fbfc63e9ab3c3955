"""This process's share of the counters every process keeps in one storage.

Requests per minute: a process takes request slots from a key's shared counter in
blocks (`block()`: 1 for small limits, so they stay exact across processes; at most
MAX_BLOCK) and hands them out without asking the storage again. The shared counter
counts every slot handed out, so the limit is never exceeded; a slot one process holds
cannot go to another, so with N processes a key may be refused up to N blocks before its
limit. Once the shared count reaches the limit, the window is full until it ends, and
this process refuses without a statement.

Tokens per day: a finished generation's tokens are counted here at once and written to
the storage within FLUSH_S, all of one key in one statement; today's shared count is
read again once it is older than FRESH_S. Another process's tokens count here within
FLUSH_S + FRESH_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from limits.aio.storage import Storage

from .ratelimit_storage import DatabaseStorage

#: Slots a process takes at once are at most this share of the limit (1/50: 2%) ...
BLOCK_SHARE = 50
#: ... and at most this many.
MAX_BLOCK = 100
#: Seconds a count read from the shared storage is used before it is read again.
FRESH_S = 1.0
#: Seconds within which a process writes the tokens it counted to the shared storage.
FLUSH_S = 0.25
#: Windows and day counts kept in memory before the ended ones are dropped.
PRUNE_AT = 4096

log = logging.getLogger(__name__)


def block(limit: int) -> int:
    """How many request slots a process takes from the shared counter at once."""
    return max(1, min(limit // BLOCK_SHARE, MAX_BLOCK))


@dataclass
class Window:
    """This process's view of one key's current window in the shared storage."""

    #: When the window ends, in seconds since the epoch.
    ends: float
    #: The shared count at the last statement: every slot handed out in this window.
    seen: int
    #: Slots this process took and has not used.
    left: int
    #: time.monotonic() of the last statement.
    read_at: float

    @property
    def used(self) -> int:
        """Requests made in this window as far as this process knows (slots other
        processes hold count as used)."""
        return self.seen - self.left


class RequestSlots:
    """Request slots of fixed one-minute windows, taken from the storage in blocks."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._windows: dict[str, Window] = {}

    async def take(self, key: str, limit: int, expiry: int) -> tuple[Window, bool]:
        """One slot of `key`'s window: (the window, whether a slot was free)."""
        window = self._current(key)
        if window is not None and window.left > 0:
            window.left -= 1
            return window, True
        if window is not None and window.seen >= limit:
            return window, False  # every slot of this window is handed out
        amount = block(limit)
        if isinstance(self.storage, DatabaseStorage):  # the count and the end in one statement
            count, ends = await self.storage.incr_window(key, expiry, amount)
        else:
            count = await self.storage.incr(key, expiry, amount=amount)
            ends = await self.storage.get_expiry(key)
        granted = max(0, min(amount, limit - (count - amount)))
        window = self._merge(key, count, ends, granted)
        if window.left == 0:
            return window, False
        window.left -= 1
        return window, True

    async def peek(self, key: str) -> Window:
        """The key's window as this process knows it, read again once it is not fresh."""
        window = self._current(key)
        if window is not None and time.monotonic() - window.read_at < FRESH_S:
            return window
        count = await self.storage.get(key)
        ends = await self.storage.get_expiry(key)
        return self._merge(key, count, ends, 0)

    def _current(self, key: str) -> Window | None:
        window = self._windows.get(key)
        if window is not None and window.ends <= time.time():
            del self._windows[key]
            return None
        return window

    def _merge(self, key: str, count: int, ends: float, granted: int) -> Window:
        """Add what a statement said to the key's window (a new one if the storage's
        window is newer); slots granted by concurrent statements add up."""
        window = self._current(key)
        now = time.monotonic()
        if window is None or ends > window.ends + 0.001:
            if len(self._windows) >= PRUNE_AT:
                self._prune()
            window = self._windows[key] = Window(ends=ends, seen=count, left=granted, read_at=now)
            return window
        window.seen = max(window.seen, count)
        window.left += granted
        window.read_at = now
        return window

    def _prune(self) -> None:
        ended = time.time()
        for key in [k for k, w in self._windows.items() if w.ends <= ended]:
            del self._windows[key]


class TokenCounts:
    """Tokens per key and day: counted here at once, written in batches, read when stale."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        #: Counted here and not yet written: key -> (tokens, expiry in seconds).
        self._pending: dict[str, tuple[int, int]] = {}
        #: Being written now: key -> tokens.
        self._writing: dict[str, int] = {}
        #: The shared count as last read or written: key -> (tokens, time.monotonic()).
        self._shared: dict[str, tuple[int, float]] = {}
        self._flusher: asyncio.Task[None] | None = None

    def _mine(self, key: str) -> int:
        return self._pending.get(key, (0, 0))[0] + self._writing.get(key, 0)

    def fresh(self, key: str) -> bool:
        """True when the shared count of `key` was read less than FRESH_S ago."""
        shared = self._shared.get(key)
        return shared is not None and time.monotonic() - shared[1] < FRESH_S

    def read(self, key: str, count: int) -> None:
        """The storage says `key` stands at `count` (what this process wrote included).
        A day's count only grows: a reading older than one already kept does not lower it."""
        if len(self._shared) >= PRUNE_AT and key not in self._shared:
            self._shared.clear()  # counts of earlier days; today's are read again
        known = self._shared.get(key, (0, 0.0))[0]
        self._shared[key] = (max(known, count), time.monotonic())

    async def used(self, key: str) -> int:
        """Tokens counted against `key`: the shared count (read again when stale) and
        what this process has not written yet."""
        if not self.fresh(key):
            self.read(key, await self.storage.get(key))
        return self._shared[key][0] + self._mine(key)

    def spend(self, key: str, tokens: int, expiry: int) -> None:
        """Count `tokens` against `key` here now; written within FLUSH_S."""
        amount, _expiry = self._pending.get(key, (0, 0))
        self._pending[key] = (amount + tokens, expiry)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        while self._pending:  # tokens counted while a flush writes wait for the next
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        """Write what this process counted, one statement per key."""
        pending, self._pending = self._pending, {}
        for key, (amount, expiry) in pending.items():
            self._writing[key] = amount
            try:
                self.read(key, await self.storage.incr(key, expiry, amount=amount))
            except Exception:  # the storage is down: keep the tokens for the next flush
                log.warning("could not count %d tokens for %s", amount, key, exc_info=True)
                held, _ = self._pending.get(key, (0, expiry))
                self._pending[key] = (held + amount, expiry)
            finally:
                del self._writing[key]

    async def close(self) -> None:
        """Write what is left."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()
