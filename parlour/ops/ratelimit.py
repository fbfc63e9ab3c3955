"""Per-key limits (requests per minute, tokens per day) and admission of new generations.

Both are counters of the `limits` library in a storage every process shares: this
process's memory on SQLite (one process), the database on PostgreSQL
(parlour.ratelimit_storage), or any `limits` storage URI such as Redis. Requests count in
fixed one-minute windows; tokens (prompt + completion, as the usage table records them)
in a counter per UTC day, added when a generation's reply ends. The usage table itself
is not summed per request: that costs time in proportion to the owner's turns of the day
(24 ms at 100,000 on PostgreSQL), a counter costs one statement.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, Storage
from limits.storage import storage_from_string

from ..auth import Principal
from ..errors import Overloaded, RateLimited
from ..settings import Settings
from ..store.db import Database
from ..turns.request import Generated
from .logs import current_request
from .observe import Observer, Watch
from .ratelimit_storage import DatabaseStorage

#: Routes that start a generation; only these count against requests per minute.
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/responses", "/api/kernel2/chat", "/chat", "/v1/chat"}
)
_MESSAGES_PATH = re.compile(r"^/conversations/[^/]+/messages/?$")
DAY = 86_400.0
#: Seconds within which a process writes the tokens it counted to the shared storage.
FLUSH_S = 0.25

log = logging.getLogger(__name__)


def is_generation(method: str, path: str) -> bool:
    """True for a request that asks the model for a reply."""
    if method != "POST":
        return False
    return path.rstrip("/") in GENERATION_PATHS or _MESSAGES_PATH.match(path) is not None


def duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it: `250ms`, `12s`, `6m0s`, `3h2m1s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Quota:
    """One limit as it stands: its size, what is left, and seconds until it resets."""

    limit: int
    remaining: int
    reset: float


@dataclass(frozen=True)
class Standing:
    """A principal's limits after this request, and the refusal if it went over one."""

    requests: Quota | None = None
    tokens: Quota | None = None
    refusal: RateLimited | None = None

    def headers(self) -> list[tuple[str, str]]:
        """OpenAI's x-ratelimit-* headers for the limits that apply."""
        headers: list[tuple[str, str]] = []
        for kind, quota in (("requests", self.requests), ("tokens", self.tokens)):
            if quota is not None:
                headers += [
                    (f"x-ratelimit-limit-{kind}", str(quota.limit)),
                    (f"x-ratelimit-remaining-{kind}", str(quota.remaining)),
                    (f"x-ratelimit-reset-{kind}", duration(quota.reset)),
                ]
        return headers


def _limit(own: int | None, default: int | None) -> int | None:
    value = own if own is not None else default
    return value if value else None


def open_storage(settings: Settings, db: Database) -> Storage:
    """Where request counters live: the configured URI, else memory or the database."""
    if settings.rate_limit_storage:
        uri = settings.rate_limit_storage
        storage = storage_from_string(uri if uri.startswith("async+") else f"async+{uri}")
        assert isinstance(storage, Storage)
        return storage
    if db.is_sqlite:
        return MemoryStorage()
    return DatabaseStorage(db.url)


class RateLimiter:
    """Checks and counts a principal's requests per minute and tokens per day."""

    def __init__(
        self,
        *,
        settings: Settings,
        storage: Storage,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.storage = storage
        #: Seconds since the epoch; tests move it to the next day.
        self.clock = clock
        #: Tokens counted here and not yet written: key -> (tokens, expiry in seconds).
        self._pending: dict[str, tuple[int, int]] = {}
        self._flusher: asyncio.Task[None] | None = None

    def limits(self, principal: Principal) -> tuple[int | None, int | None]:
        """(requests per minute, tokens per day) for a principal; None: unlimited."""
        return (
            _limit(principal.requests_per_minute, self.settings.requests_per_minute),
            _limit(principal.tokens_per_day, self.settings.tokens_per_day),
        )

    async def check(self, principal: Principal, *, consume: bool) -> Standing:
        """The principal's standing; with `consume` this request counts and may be refused."""
        rpm, tpd = self.limits(principal)
        if rpm is None and tpd is None:
            return Standing()
        count, ends, used = await self._counts(principal, rpm, tpd, consume=consume)
        requests = tokens = None
        if rpm is not None:
            reset = max(0.0, ends - time.time())
            requests = Quota(limit=rpm, remaining=max(0, rpm - count), reset=reset)
            if consume and count > rpm:
                return Standing(
                    requests=requests,
                    refusal=RateLimited(
                        f"Rate limit reached: {rpm} requests per minute. Try again in "
                        f"{duration(reset)}.",
                        retry_after=reset,
                    ),
                )
        if tpd is not None:
            tokens = Quota(limit=tpd, remaining=max(0, tpd - used), reset=self._day(principal)[1])
            if consume and used >= tpd:
                return Standing(
                    requests=requests,
                    tokens=tokens,
                    refusal=RateLimited(
                        f"Token quota reached: {tpd} tokens per day (UTC). It resets in "
                        f"{duration(tokens.reset)}.",
                        retry_after=tokens.reset,
                        kind="tokens",
                    ),
                )
        return Standing(requests=requests, tokens=tokens)

    async def _counts(
        self, principal: Principal, rpm: int | None, tpd: int | None, *, consume: bool
    ) -> tuple[int, float, int]:
        """(requests in this minute's window with this one if `consume`, when the window
        ends, tokens used today): FixedWindowRateLimiter.hit() and get_window_stats(), in
        one statement where the storage can (the database)."""
        item = RateLimitItemPerMinute(rpm or 1)
        key = item.key_for("parlour", _who(principal)) if rpm is not None else None
        day = self._day(principal)[0] if tpd is not None else None
        storage = self.storage
        unwritten = self._pending.get(day, (0, 0))[0] if day is not None else 0
        if consume and key is not None and isinstance(storage, DatabaseStorage):
            count, ends, used = await storage.hit(key, item.get_expiry(), also=day)
            return count, ends, used + unwritten
        count, ends, used = 0, 0.0, 0
        if key is not None:
            count = await (storage.incr(key, item.get_expiry()) if consume else storage.get(key))
            ends = await storage.get_expiry(key)
        if day is not None:
            used = await storage.get(day)
        return count, ends, used + unwritten

    def _day(self, principal: Principal) -> tuple[str, float]:
        """The key of the principal's token counter today (UTC), and seconds until midnight."""
        now = self.clock()
        day = int(now // DAY)  # days since the epoch: UTC days, as POSIX time has no leap seconds
        return f"parlour/tokens/{_who(principal)}/{day}", (day + 1) * DAY - now

    async def close(self) -> None:
        """Write the tokens not yet counted, and release the storage's connections."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._flush()
        if isinstance(self.storage, DatabaseStorage):
            await self.storage.close()

    def spend(self, principal: Principal, tokens: int) -> None:
        """Count a finished generation's tokens against the principal's quota for today.

        This process sees them at once; they are written to the shared storage within
        FLUSH_S, all of one key in one statement, so a busy key costs no write per request.
        """
        if tokens <= 0 or self.limits(principal)[1] is None:
            return
        key, reset = self._day(principal)
        # Kept an hour past midnight, so a clock a little behind still finds today's.
        amount, _expiry = self._pending.get(key, (0, 0))
        self._pending[key] = (amount + tokens, math.ceil(reset) + 3600)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_S)
        await self._flush()

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for key, (amount, expiry) in pending.items():
            try:
                await self.storage.incr(key, expiry, amount=amount)
            except Exception:  # the storage is down: keep the tokens for the next flush
                log.warning("could not count %d tokens for %s", amount, key, exc_info=True)
                held, _ = self._pending.get(key, (0, expiry))
                self._pending[key] = (held + amount, expiry)


def _who(principal: Principal) -> str:
    """Whose counters: the API key's, else the owner's (a JWT subject, the local owner)."""
    return f"key:{principal.key_id}" if principal.key_id else f"owner:{principal.owner_id}"


class TokenMeter(Observer):
    """Adds each generation's tokens to the request it serves (RequestInfo.tokens), for
    the limits to count when the response ends."""

    def watch(self) -> Watch:
        """A watch for the generation of the current request (if any)."""
        return _MeterWatch()


class _MeterWatch(Watch):
    __slots__ = ()

    def generated(self, result: Generated) -> None:
        info = current_request.get()
        if info is not None:
            info.tokens += result.prompt_tokens + result.completion_tokens


class Admission:
    """Counts this process's generations in flight, in all and per owner, and refuses more
    than the configured bounds at once."""

    def __init__(self, *, max_queue: int | None, max_per_owner: int | None) -> None:
        self.max_queue = max_queue or None
        self.max_per_owner = max_per_owner or None
        self.in_flight = 0
        self._owners: dict[uuid.UUID, int] = {}

    def enter(self, owner_id: uuid.UUID) -> None:
        """Admit one generation, or raise Overloaded (queue full) or RateLimited (owner)."""
        if self.max_queue is not None and self.in_flight >= self.max_queue:
            raise Overloaded(
                f"The server is busy: {self.in_flight} generations are already queued. "
                "Try again shortly.",
                retry_after=1.0,
            )
        mine = self._owners.get(owner_id, 0)
        if self.max_per_owner is not None and mine >= self.max_per_owner:
            raise RateLimited(
                f"Too many generations at once: at most {self.max_per_owner} per owner. Wait "
                "for one to finish.",
                retry_after=1.0,
                kind="concurrency",
            )
        self.in_flight += 1
        self._owners[owner_id] = mine + 1

    def leave(self, owner_id: uuid.UUID) -> None:
        """One admitted generation is over."""
        self.in_flight -= 1
        mine = self._owners.get(owner_id, 1) - 1
        if mine > 0:
            self._owners[owner_id] = mine
        else:
            self._owners.pop(owner_id, None)
