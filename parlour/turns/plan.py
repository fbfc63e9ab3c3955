"""A turn's model, bot, system prompt, knowledge and reply budget: decided once, here."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import select

from ..backends.base import Backend, ChatMessage
from ..errors import BotNotFound
from ..knowledge import index as knowledge
from ..knowledge.index import Hit
from ..models import LoadedModel, ModelRegistry
from ..store.db import Database
from ..store.tables import Bot
from .context import check_fits, system_messages
from .request import BotRef, Sampling, TurnRequest


@dataclass(frozen=True)
class Plan:
    """What a turn uses: model, bot, system prompt parts, sampling and reply budget."""

    model: LoadedModel
    bot: Bot | None
    system: tuple[str, ...]
    sampling: Sampling
    #: Tokens kept free for the reply when the context is fitted.
    reserve: int
    #: The most tokens the reply may take, room in the window permitting.
    limit: int

    @property
    def backend(self) -> Backend:
        """The backend that generates."""
        return self.model.backend

    def max_tokens(self, prompt_tokens: int) -> int:
        """The reply's length limit once the prompt's size is known."""
        return max(1, min(self.limit, self.backend.context_length - prompt_tokens))


async def load_bot(db: Database, ref: BotRef | uuid.UUID | None) -> Bot | None:
    """The bot a request names (BotNotFound if none) or a conversation uses (None if gone)."""
    if ref is None:
        return None
    async with db.read() as session, session.begin():
        if isinstance(ref, uuid.UUID):
            return await session.get(Bot, ref)
        bot: Bot | None = None
        uid = _uuid(ref.ref) if ref.by != "slug" else None
        if uid is not None:
            bot = await session.get(Bot, uid)
        elif ref.by != "uid":
            bot = await session.scalar(select(Bot).where(Bot.slug == ref.ref))
    if bot is None:
        raise BotNotFound(ref.ref)
    return bot


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def model_name(
    models: ModelRegistry, *, bot: Bot | None, requested: str | None, stored: str | None
) -> str | None:
    """Which model answers: the bot's, else the requested one if configured, else the
    conversation's (None: the default); an unknown requested name is refused only in
    strict mode."""
    if bot is not None and bot.model:
        return bot.model
    if requested and models.knows(requested):
        return requested
    if requested:
        models.get(requested)  # raises ModelNotFound in strict mode
    return stored


def choose_model(
    models: ModelRegistry, *, bot: Bot | None, requested: str | None, stored: str | None
) -> LoadedModel:
    """The model that answers (model_name), once it is loaded."""
    return models.ready_model(model_name(models, bot=bot, requested=requested, stored=stored))


def system_parts(bot: Bot | None, request: Sequence[str], *, replaces: bool) -> tuple[str, ...]:
    """The bot's system prompt, then the request's (or only the bot's when it replaces)."""
    if bot is not None and replaces:
        return (bot.system_prompt,)
    parts = [bot.system_prompt] if bot is not None and bot.system_prompt.strip() else []
    return (*parts, *(s for s in request if s.strip()))


def reply_budget(model: LoadedModel, requested: int | None, *, shrink: bool) -> tuple[int, int]:
    """(reserve, limit): tokens kept free for the reply while fitting, and its most tokens."""
    window = model.backend.context_length
    if shrink:
        wanted = requested or model.spec.max_tokens
        return min(wanted, max(1, window // 2)), wanted
    budget = requested or min(model.spec.max_tokens, window // 2)
    return budget, budget


def settle(
    models: ModelRegistry,
    request: TurnRequest,
    *,
    bot: Bot | None,
    stored_system: str | None = None,
    stored_model: str | None = None,
) -> Plan:
    """The plan for a request; raises ContextLengthExceeded unless the new message fits."""
    model = choose_model(models, bot=bot, requested=request.model, stored=stored_model)
    sampling = request.sampling
    if bot is not None:
        sampling = replace(
            sampling,
            temperature=bot.temperature if bot.temperature is not None else sampling.temperature,
            max_tokens=bot.max_tokens or sampling.max_tokens,
        )
    asked = request.system or ((stored_system,) if stored_system else ())
    system = system_parts(bot, asked, replaces=request.bot_replaces_system)
    reserve, limit = reply_budget(model, sampling.max_tokens, shrink=request.shrink_reply)
    check_fits(model.backend, system=system_messages(system), new=request.new, reply_budget=reserve)
    return Plan(
        model=model, bot=bot, system=system, sampling=sampling, reserve=reserve, limit=limit
    )


def last_user_text(messages: Sequence[ChatMessage]) -> str:
    """The newest user message's text, the query for retrieval."""
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


async def retrieve(
    db: Database, request: TurnRequest, bot: Bot | None, messages: Sequence[ChatMessage]
) -> list[Hit]:
    """Knowledge for the turn: the bot's knowledge base if its L0 retrieval is on, else the
    default one if the request asks for retrieval."""
    if bot is not None and not bot.enable_l0_retrieval:
        return []
    if bot is None and not request.retrieval:
        return []
    async with db.read() as session, session.begin():
        return await knowledge.retrieve(
            session, last_user_text(messages), kb_id=bot.kb_id if bot is not None else None
        )
