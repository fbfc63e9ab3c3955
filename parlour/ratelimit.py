"""Per-key limits (requests per minute, tokens per day) and admission of new generations.

Requests per minute are counted by the `limits` library (fixed one-minute windows) in a
storage every process shares: this process's memory on SQLite (one process), the
database on PostgreSQL (parlour.ratelimit_storage), or any `limits` storage URI such as
Redis. Tokens per day are read from the usage table, which already holds every
generation's prompt and completion tokens per owner: no second counter to keep in step,
the same figures /v1/usage reports, and shared by every process that shares the database.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string
from sqlalchemy import func, select

from .auth import Principal
from .errors import Overloaded, RateLimited
from .settings import Settings
from .store.db import Database
from .store.tables import Usage

#: Routes that start a generation; only these count against requests per minute.
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/responses", "/api/kernel2/chat", "/chat", "/v1/chat"}
)
_MESSAGES_PATH = re.compile(r"^/conversations/[^/]+/messages/?$")
DAY = 86_400.0


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
    from .ratelimit_storage import DatabaseStorage

    return DatabaseStorage(db.engine)


class RateLimiter:
    """Checks and counts a principal's requests per minute and tokens per day."""

    def __init__(
        self,
        *,
        db: Database,
        settings: Settings,
        storage: Storage,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.settings = settings
        self.storage = storage
        self.strategy = FixedWindowRateLimiter(storage)
        #: Seconds since the epoch; tests move it to the next day.
        self.clock = clock

    def limits(self, principal: Principal) -> tuple[int | None, int | None]:
        """(requests per minute, tokens per day) for a principal; None: unlimited."""
        return (
            _limit(principal.requests_per_minute, self.settings.requests_per_minute),
            _limit(principal.tokens_per_day, self.settings.tokens_per_day),
        )

    async def check(self, principal: Principal, *, consume: bool) -> Standing:
        """The principal's standing; with `consume` this request counts and may be refused."""
        rpm, tpd = self.limits(principal)
        requests = tokens = None
        if rpm is not None:
            requests, allowed = await self._requests(principal, rpm, consume=consume)
            if not allowed:
                return Standing(
                    requests=requests,
                    refusal=RateLimited(
                        f"Rate limit reached: {rpm} requests per minute. Try again in "
                        f"{duration(requests.reset)}.",
                        retry_after=requests.reset,
                    ),
                )
        if tpd is not None:
            tokens = await self._tokens(principal.owner_id, tpd)
            if consume and tokens.remaining <= 0:
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
        self, principal: Principal, rpm: int, *, consume: bool
    ) -> tuple[Quota, bool]:
        item = RateLimitItemPerMinute(rpm)
        who = f"key:{principal.key_id}" if principal.key_id else f"owner:{principal.owner_id}"
        allowed = await self.strategy.hit(item, "parlour", who) if consume else True
        stats = await self.strategy.get_window_stats(item, "parlour", who)
        reset = max(0.0, stats.reset_time - time.time())
        return Quota(limit=rpm, remaining=stats.remaining, reset=reset), allowed

    async def _tokens(self, owner_id: uuid.UUID, tpd: int) -> Quota:
        now = datetime.fromtimestamp(self.clock(), UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        used = await self.tokens_used(owner_id, since=midnight)
        reset = (midnight + timedelta(days=1) - now).total_seconds()
        return Quota(limit=tpd, remaining=max(0, tpd - used), reset=reset)

    async def tokens_used(self, owner_id: uuid.UUID, *, since: datetime) -> int:
        """Prompt and completion tokens of the owner's generations since `since`."""
        query = select(
            func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0)
        ).where(Usage.owner_id == owner_id, Usage.created_at >= since)
        async with self.db.read() as session, session.begin():
            return int(await session.scalar(query) or 0)


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
