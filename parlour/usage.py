"""Usage figures: tokens of every generation, and their totals per user, bot and day."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from .store import queries
from .store.db import TransactionConnection
from .store.direct import Prepared
from .store.tables import Bot, Usage, utcnow

_USAGE = cast(Table, Usage.__table__)
_INSERT_USAGE = Prepared(insert(_USAGE), columns=[c.key for c in _USAGE.c])


async def add(
    conn: TransactionConnection,
    *,
    owner_id: uuid.UUID,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    bot_id: uuid.UUID | None = None,
    user_id: str | None = None,
    dialect: str | None = None,
    now: datetime | None = None,
) -> None:
    """Add one generation's tokens with a Core statement, inside the caller's transaction."""
    await queries.run(
        conn,
        _INSERT_USAGE,
        {
            "id": uuid.uuid4(),
            "owner_id": owner_id,
            "bot_id": bot_id,
            "model": model,
            "user_id": user_id[:255] if user_id is not None else None,
            "dialect": dialect,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "created_at": now or utcnow(),
        },
    )


@dataclass(frozen=True)
class UsageTotal:
    """Tokens of one user with one bot on one day (UTC)."""

    day: str
    user_id: str | None
    bot_id: uuid.UUID | None
    bot_slug: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, Any]:
        """The JSON form `GET /v1/usage` returns."""
        return {
            "day": self.day,
            "user_id": self.user_id,
            "bot_uid": str(self.bot_id) if self.bot_id is not None else None,
            "bot_slug": self.bot_slug,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _day(session: AsyncSession) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "sqlite":
        # Stored as UTC text; date() takes its first ten characters' worth.
        return func.date(Usage.created_at)
    return func.date(func.timezone("UTC", Usage.created_at))


def _start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


async def totals(
    session: AsyncSession,
    *,
    since: date | None = None,
    until: date | None = None,
    user_id: str | None = None,
    bot_id: uuid.UUID | None = None,
) -> list[UsageTotal]:
    """Totals grouped by day, user and bot, newest day first; `until` is inclusive."""
    day = _day(session).label("day")
    query = (
        select(
            day,
            Usage.user_id,
            Usage.bot_id,
            Bot.slug,
            func.count(),
            func.sum(Usage.prompt_tokens),
            func.sum(Usage.completion_tokens),
        )
        .outerjoin(Bot, Bot.uid == Usage.bot_id)
        .group_by(day, Usage.user_id, Usage.bot_id, Bot.slug)
        .order_by(day.desc(), Usage.user_id, Bot.slug)
    )
    if since is not None:
        query = query.where(Usage.created_at >= _start(since))
    if until is not None:
        query = query.where(Usage.created_at < _start(until + timedelta(days=1)))
    if user_id is not None:
        query = query.where(Usage.user_id == user_id)
    if bot_id is not None:
        query = query.where(Usage.bot_id == bot_id)
    rows = await session.execute(query)
    return [
        UsageTotal(
            day=str(d),
            user_id=u,
            bot_id=b,
            bot_slug=slug,
            requests=int(n),
            prompt_tokens=int(p or 0),
            completion_tokens=int(c or 0),
        )
        for d, u, b, slug, n, p, c in rows
    ]
