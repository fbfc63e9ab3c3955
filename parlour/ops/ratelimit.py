"""Per-key limits (requests per minute, tokens per day) and admission of new generations.

Both are counters of the `limits` library in a storage every process shares: this
process's memory on SQLite (one process), the database on PostgreSQL
(parlour.ops.ratelimit_storage), or any `limits` storage URI such as Redis. Requests count in
fixed one-minute windows; tokens (prompt + completion, as the usage table records them)
in a counter per UTC day, added when a generation's reply ends. How a process shares
them without a statement per request: parlour.ops.counters. The usage table itself is not
summed per request: that costs time in proportion to the owner's turns of the day
(24 ms at 100,000 on PostgreSQL), a counter costs one statement.
"""

from __future__ import annotations

import functools
import math
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
from .counters import RequestSlots, TokenCounts
from .logs import RequestWatch, current_request
from .observe import Observer, Watch
from .ratelimit_storage import DatabaseStorage

DAY = 86_400.0
#: Seconds of a request window.
MINUTE = RateLimitItemPerMinute(1).get_expiry()


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
        self.slots = RequestSlots(storage)
        self.tokens = TokenCounts(storage)

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
        who = _who(principal.key_id, principal.owner_id)
        day, until_midnight = self._day(who)
        requests = tokens = None
        if rpm is not None:
            requests, refusal = await self._requests(who, rpm, consume)
            if refusal is not None:
                return Standing(requests=requests, refusal=refusal)
        if tpd is not None:
            spent = await self.tokens.used(day)
            tokens = Quota(limit=tpd, remaining=max(0, tpd - spent), reset=until_midnight)
            if consume and spent >= tpd:
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

    async def _requests(
        self, who: str, rpm: int, consume: bool
    ) -> tuple[Quota, RateLimited | None]:
        """The request quota (this request taken from it with `consume`), and the refusal
        if none was left."""
        key = _request_key(who, rpm)
        if consume:
            window, taken = await self.slots.take(key, rpm, MINUTE)
        else:
            window, taken = await self.slots.peek(key), True
        reset = max(0.0, window.ends - time.time())
        quota = Quota(limit=rpm, remaining=max(0, rpm - window.used), reset=reset)
        if taken:
            return quota, None
        refusal = RateLimited(
            f"Rate limit reached: {rpm} requests per minute. Try again in {duration(reset)}.",
            retry_after=reset,
        )
        return quota, refusal

    def _day(self, who: str) -> tuple[str, float]:
        """The key of `who`'s token counter today (UTC), and seconds until midnight."""
        now = self.clock()
        day = int(now // DAY)  # days since the epoch: UTC days, as POSIX time has no leap seconds
        return _day_key(who, day), (day + 1) * DAY - now

    async def close(self) -> None:
        """Write the tokens not yet counted, and release the storage's connections."""
        await self.tokens.close()
        if isinstance(self.storage, DatabaseStorage):
            await self.storage.close()

    def spend(self, principal: Principal, tokens: int) -> None:
        """Count a finished generation's tokens against the principal's quota for today:
        this process sees them at once, the others within a second (TokenCounts)."""
        if tokens <= 0 or self.limits(principal)[1] is None:
            return
        key, reset = self._day(_who(principal.key_id, principal.owner_id))
        # Kept an hour past midnight, so a clock a little behind still finds today's.
        self.tokens.spend(key, tokens, math.ceil(reset) + 3600)


@functools.lru_cache(maxsize=4096)
def _who(key_id: uuid.UUID | None, owner_id: uuid.UUID) -> str:
    """Whose counters: the API key's, else the owner's (a JWT subject, the local owner)."""
    return f"key:{key_id}" if key_id else f"owner:{owner_id}"


@functools.lru_cache(maxsize=4096)
def _request_key(who: str, rpm: int) -> str:
    """The key of `who`'s request counter; it names the limit, so a key whose limit
    changes starts a new count."""
    return RateLimitItemPerMinute(rpm).key_for("parlour", who)


@functools.lru_cache(maxsize=4096)
def _day_key(who: str, day: int) -> str:
    """The key of `who`'s token counter on a day (days since the epoch)."""
    return f"parlour/tokens/{who}/{day}"


class RequestMeter(Observer):
    """Tells the request that starts a generation (its RequestWatch, when a route follows
    it) that the generation began, what tokens it used and that it ended, even after
    the response has gone."""

    def watch(self) -> Watch:
        """A watch for a generation the current request starts."""
        info = current_request.get()
        if info is None or info.watch is None:
            return self._silent
        info.watch.began()
        return _MeterWatch(info.watch)


class _MeterWatch(Watch):
    __slots__ = ("ended", "request")

    def __init__(self, request: RequestWatch) -> None:
        self.request = request
        self.ended = False

    def generated(self, result: Generated) -> None:
        self.request.generated(result.prompt_tokens + result.completion_tokens)

    def done(self, model: str | None) -> None:
        if not self.ended:
            self.ended = True
            self.request.ended()


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
