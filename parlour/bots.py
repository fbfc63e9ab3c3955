"""Bots (Second Me calls them roles): a system prompt, model settings and a knowledge base."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import Conflict, InvalidRequest, NotFound
from .knowledge import index as knowledge
from .store.tables import Bot, KnowledgeBase, iso_utc, utcnow

_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")

#: Fields a bot can be created or edited with; `kb` is a knowledge base's name.
FIELDS = (
    "slug",
    "name",
    "description",
    "system_prompt",
    "model",
    "temperature",
    "max_tokens",
    "enable_l0_retrieval",
    "kb",
    "welcome_message",
)


@dataclass(frozen=True)
class BotView:
    """A bot with the name of its knowledge base."""

    bot: Bot
    kb: str | None

    def as_dict(self) -> dict[str, Any]:
        """Every field of the bot, as the admin API and `parlour bot show --json` print it."""
        bot = self.bot
        values = {name: self.kb if name == "kb" else getattr(bot, name) for name in FIELDS}
        return {
            "uid": str(bot.uid),
            **values,
            "created_at": iso_utc(bot.created_at),
            "updated_at": iso_utc(bot.updated_at),
        }


def _text(field: str, value: Any, *, required: bool = False, limit: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string.", param=field)
    if required and not value.strip():
        raise InvalidRequest(f"{field} must not be empty.", param=field)
    if limit is not None and len(value) > limit:
        raise InvalidRequest(f"{field} must be at most {limit} characters.", param=field)
    return value


def _check(field: str, value: Any) -> Any:
    """A field's value, validated; raises InvalidRequest naming the field."""
    if field == "slug":
        if not isinstance(value, str) or not _SLUG.match(value):
            raise InvalidRequest(
                f"Invalid slug {value!r}: use 1 to 64 lowercase letters, digits and '-', "
                "starting with a letter or digit (like `tax-helper`).",
                param="slug",
            )
        return value
    if field == "name":
        return _text(field, value, required=True, limit=255).strip()
    if field in ("description", "system_prompt", "welcome_message"):
        return _text(field, value)
    if field == "model":
        return None if value in (None, "") else _text(field, value, limit=255)
    if field == "temperature":
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidRequest("temperature must be a number from 0 to 2.", param=field)
        if not 0 <= value <= 2:
            raise InvalidRequest("temperature must be from 0 to 2.", param=field)
        return float(value)
    if field == "max_tokens":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest("max_tokens must be a whole number of at least 1.", param=field)
        return value
    if field == "enable_l0_retrieval":
        if not isinstance(value, bool):
            raise InvalidRequest("enable_l0_retrieval must be true or false.", param=field)
        return value
    if field == "kb":
        return None if value in (None, "") else _text(field, value)
    raise InvalidRequest(f"Unknown bot field {field!r}; known: {', '.join(FIELDS)}.", param=field)


async def _kb_id(session: AsyncSession, name: str | None) -> uuid.UUID | None:
    return None if name is None else (await knowledge.get_kb(session, name)).id


async def _kb_name(session: AsyncSession, kb_id: uuid.UUID | None) -> str | None:
    if kb_id is None:
        return None
    return await session.scalar(select(KnowledgeBase.name).where(KnowledgeBase.id == kb_id))


async def find_bot(session: AsyncSession, ref: str) -> Bot | None:
    """The bot whose uid or slug is `ref`."""
    try:
        uid = uuid.UUID(ref)
    except ValueError:
        return await session.scalar(select(Bot).where(Bot.slug == ref))
    return await session.get(Bot, uid)


async def get_bot(session: AsyncSession, ref: str) -> Bot:
    """The bot whose uid or slug is `ref`, or NotFound."""
    bot = await find_bot(session, ref)
    if bot is None:
        raise NotFound("Bot not found")
    return bot


async def view(session: AsyncSession, bot: Bot) -> BotView:
    """A bot with its knowledge base's name."""
    return BotView(bot, await _kb_name(session, bot.kb_id))


async def list_bots(session: AsyncSession) -> list[BotView]:
    """Every bot, by slug."""
    rows = await session.execute(
        select(Bot, KnowledgeBase.name)
        .outerjoin(KnowledgeBase, KnowledgeBase.id == Bot.kb_id)
        .order_by(Bot.slug)
    )
    return [BotView(bot, kb) for bot, kb in rows]


async def chosen_uid(session: AsyncSession, value: Any) -> uuid.UUID:
    """The uid a new bot asks for (a new random one when None), checked to be free."""
    if value is None:
        return uuid.uuid4()
    try:
        uid = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise InvalidRequest(
            f"Invalid uid {value!r}: give a UUID like edf826b8-1b75-4f57-bd26-641c897f9c1e.",
            param="uid",
        ) from None
    if await session.get(Bot, uid) is not None:
        raise Conflict(f"A bot with uid {uid} already exists.", param="uid")
    return uid


async def create_bot(session: AsyncSession, values: Mapping[str, Any]) -> BotView:
    """A new bot. `slug`, `name` and `system_prompt` are required; the L0 flag defaults to
    on when a knowledge base is given."""
    missing = [f for f in ("slug", "name", "system_prompt") if values.get(f) is None]
    if missing:
        raise InvalidRequest(f"Missing {', '.join(missing)} for the new bot.", param=missing[0])
    uid = await chosen_uid(session, values.get("uid"))
    clean = {field: _check(field, value) for field, value in values.items() if field != "uid"}
    if await session.scalar(select(Bot.uid).where(Bot.slug == clean["slug"])) is not None:
        raise Conflict(f"A bot with slug {clean['slug']!r} already exists.", param="slug")
    kb = clean.get("kb")
    l0 = clean.get("enable_l0_retrieval")
    now = utcnow()
    bot = Bot(
        uid=uid,
        slug=clean["slug"],
        name=clean["name"],
        description=clean.get("description") or "",
        system_prompt=clean["system_prompt"],
        model=clean.get("model"),
        temperature=clean.get("temperature"),
        max_tokens=clean.get("max_tokens"),
        enable_l0_retrieval=(kb is not None) if l0 is None else l0,
        kb_id=await _kb_id(session, kb),
        welcome_message=clean.get("welcome_message") or "",
        created_at=now,
        updated_at=now,
    )
    session.add(bot)
    await session.flush()
    return BotView(bot, kb)


async def update_bot(session: AsyncSession, bot: Bot, changes: Mapping[str, Any]) -> BotView:
    """Change some fields of a bot; `None` clears model, temperature, max_tokens and kb."""
    clean = {field: _check(field, value) for field, value in changes.items()}
    for field in ("slug", "name", "system_prompt", "description", "welcome_message"):
        if field in clean and clean[field] is None:
            raise InvalidRequest(f"{field} cannot be cleared.", param=field)
    slug = clean.get("slug")
    if slug is not None and slug != bot.slug:
        taken = await session.scalar(select(Bot.uid).where(Bot.slug == slug))
        if taken is not None:
            raise Conflict(f"A bot with slug {slug!r} already exists.", param="slug")
    for field, value in clean.items():
        if field == "kb":
            bot.kb_id = await _kb_id(session, value)
        else:
            setattr(bot, field, value)
    bot.updated_at = utcnow()
    await session.flush()
    return await view(session, bot)


async def remove_bot(session: AsyncSession, bot: Bot) -> None:
    """Delete a bot; its usage figures stay."""
    await session.delete(bot)
    await session.flush()
