"""A turn: lock the conversation, persist the user message, fit the context, generate, persist."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from . import bots, knowledge, usage
from .backends.base import ChatMessage, FinishReason, GenerationParams
from .context import HistoryItem, check_fits, fit_with_knowledge, system_messages
from .errors import InvalidRequest, NotFound
from .generation import GenerationStream
from .locks import turn_locks
from .models import LoadedModel, ModelRegistry
from .store import queries
from .store.db import Database
from .store.tables import Bot, Conversation, Message

if TYPE_CHECKING:
    from .stateless import CompletionRequest, CompletionStream

log = logging.getLogger(__name__)

DEFAULT_TITLE = "New conversation"
TITLE_LENGTH = 80


@dataclass(frozen=True)
class Sampling:
    """What a request asked for; None leaves the choice to the model's defaults."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def params(self, max_tokens: int) -> GenerationParams:
        """Backend parameters with the reply length settled."""
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def with_bot(self, bot: Bot | None) -> Sampling:
        """These settings with a bot's temperature and max tokens winning where it sets them."""
        if bot is None:
            return self
        return replace(
            self,
            temperature=bot.temperature if bot.temperature is not None else self.temperature,
            max_tokens=bot.max_tokens or self.max_tokens,
        )


@dataclass(frozen=True)
class TurnPlan:
    """What a turn uses: its model, system prompt parts, sampling and reply budget."""

    model: LoadedModel
    system: tuple[str, ...]
    sampling: Sampling
    budget: int
    new: ChatMessage


def plan_turn(
    models: ModelRegistry,
    *,
    content: str,
    model: str | None,
    bot: Bot | None,
    system_prompt: str | None,
    sampling: Sampling,
) -> TurnPlan:
    """Settle a turn's model, system prompt (the bot's, then the conversation's) and sampling
    (the bot's model and settings win, as on the stateless path); raise
    ContextLengthExceeded unless the new message fits."""
    chosen = models.ready_model((bot.model if bot is not None and bot.model else None) or model)
    sampling = sampling.with_bot(bot)
    system = tuple(bots.system_parts(bot, [system_prompt] if system_prompt else []))
    backend = chosen.backend
    budget = sampling.max_tokens or min(chosen.spec.max_tokens, backend.context_length // 2)
    new = ChatMessage("user", content)
    check_fits(backend, system=system_messages(system), new=new, reply_budget=budget)
    return TurnPlan(model=chosen, system=system, sampling=sampling, budget=budget, new=new)


@dataclass(frozen=True)
class TurnRequest:
    """One new user message for an existing conversation."""

    owner_id: uuid.UUID
    conversation_id: uuid.UUID
    content: str
    sampling: Sampling = Sampling()
    #: A model name to use instead of the conversation's own.
    model: str | None = None
    #: Replaces the conversation's stored system prompt when given.
    system_prompt: str | None = None
    #: Recorded with the usage figures: the bot used, the end user the request names,
    #: and the dialect that asked.
    bot_id: uuid.UUID | None = None
    user_id: str | None = None
    dialect: str | None = None


@dataclass(frozen=True)
class TurnResult:
    """How a turn ended, with both persisted messages."""

    conversation: Conversation
    user_message: Message
    assistant_message: Message
    model: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class TurnStream(GenerationStream[TurnResult]):
    """A running turn: iterate it for text deltas, then await result(); cancel() stops it."""

    cancelled_message = "The client went away before the turn started."

    def __init__(self, engine: Engine, request: TurnRequest) -> None:
        self._engine = engine
        self._request = request
        super().__init__(engine.running)

    async def _work(self) -> None:
        async with self._engine.locks.hold(self._request.conversation_id):
            self._interruptible = False
            await self._turn()

    async def _turn(self) -> None:
        engine, request = self._engine, self._request
        if self._cancel_requested:
            raise asyncio.CancelledError
        async with engine.db.session() as session, session.begin():
            conversation = await queries.conversation_for_owner(
                session, request.owner_id, request.conversation_id
            )
            if conversation is None:
                raise NotFound("Conversation not found")
            bot = await session.get(Bot, conversation.bot_id) if conversation.bot_id else None
            plan = plan_turn(
                engine.models,
                content=request.content,
                model=request.model or conversation.model_tag,
                bot=bot,
                system_prompt=(
                    request.system_prompt
                    if request.system_prompt is not None
                    else conversation.system_prompt
                ),
                sampling=request.sampling,
            )
            model, backend, new, budget = plan.model, plan.model.backend, plan.new, plan.budget
            self.model = model.spec.name
            hits = (
                await knowledge.retrieve(session, request.content, kb_id=bot.kb_id)
                if bot is not None and bot.enable_l0_retrieval
                else []
            )
            if request.system_prompt is not None and request.system_prompt != (
                conversation.system_prompt
            ):
                conversation.system_prompt = request.system_prompt
            if not conversation.title or conversation.title == DEFAULT_TITLE:
                title = " ".join(request.content.split())[:TITLE_LENGTH]
                if title:
                    conversation.title = title
            history = await queries.list_messages(session, conversation.id)
            user_message = await queries.append_message(
                session,
                conversation,
                role="user",
                content=request.content,
                token_count=backend.count_tokens(request.content),
            )
        fitted, _kept = fit_with_knowledge(
            backend,
            parts=plan.system,
            hits=hits,
            history=[
                HistoryItem(ChatMessage(m.role, m.content), m.token_count)  # type: ignore[arg-type]
                for m in history
                if m.role in ("user", "assistant")
            ],
            new=new,
            reply_budget=budget,
        )
        self._begin()

        max_tokens = min(budget, backend.context_length - fitted.prompt_tokens)
        generated = await self._generate(
            backend,
            fitted.messages,
            plan.sampling.params(max(1, max_tokens)),
            prompt_tokens=fitted.prompt_tokens,
            session=str(conversation.id),
        )
        async with engine.db.session() as session, session.begin():
            assistant = await queries.append_message(
                session,
                conversation,
                role="assistant",
                content=generated.text,
                token_count=backend.count_tokens(generated.text),
                model_tag=model.spec.name,
                inference_time_ms=generated.elapsed_ms,
                finish_reason=generated.finish_reason,
            )
            await usage.record(
                session,
                owner_id=request.owner_id,
                bot_id=request.bot_id or (bot.uid if bot is not None else None),
                model=model.spec.name,
                user_id=request.user_id,
                dialect=request.dialect,
                prompt_tokens=generated.prompt_tokens,
                completion_tokens=generated.completion_tokens,
            )
        self._finish(
            TurnResult(
                conversation=conversation,
                user_message=user_message,
                assistant_message=assistant,
                model=model.spec.name,
                finish_reason=generated.finish_reason,
                prompt_tokens=generated.prompt_tokens,
                completion_tokens=generated.completion_tokens,
            )
        )


class Engine:
    """The shared core every dialect calls: conversations, sessions and turns."""

    def __init__(self, *, db: Database, models: ModelRegistry) -> None:
        self.db = db
        self.models = models
        self.locks = turn_locks(db.url, is_sqlite=db.is_sqlite)
        self.running: set[GenerationStream[object]] = set()

    async def owner_id(self, name: str) -> uuid.UUID:
        """The id of the owner with this name, created on first use."""
        async with self.db.session() as session, session.begin():
            return (await queries.ensure_owner(session, name)).id

    async def session_conversation(
        self,
        *,
        owner_id: uuid.UUID,
        session_key: str,
        model: str | None,
        bot_id: uuid.UUID | None = None,
        content: str | None = None,
        system_prompt: str | None = None,
        sampling: Sampling = Sampling(),
    ) -> Conversation:
        """The conversation bound to a session key, created on first use.

        With `bot_id` the conversation uses that bot from now on. With `content` (the first
        message, with its `system_prompt` and `sampling`) a new conversation is only created
        once that message is known to fit, so a rejected message leaves no empty conversation.
        """
        for _ in range(3):
            async with self.db.read() as session, session.begin():
                found = await queries.conversation_for_session(session, owner_id, session_key)
                bot = await session.get(Bot, bot_id) if bot_id is not None else None
            if bot_id is not None and bot is None:
                raise NotFound("Bot not found; `parlour bot list` shows the bots.")
            if found is not None:
                if bot_id is not None and found.bot_id != bot_id:
                    async with self.db.session() as session, session.begin():
                        await session.execute(
                            update(Conversation)
                            .where(Conversation.id == found.id)
                            .values(bot_id=bot_id)
                        )
                    found.bot_id = bot_id
                return found
            if content is not None:
                plan_turn(
                    self.models,
                    content=content,
                    model=model,
                    bot=bot,
                    system_prompt=system_prompt,
                    sampling=sampling,
                )
            try:
                async with self.db.session() as session, session.begin():
                    return await queries.create_conversation(
                        session,
                        owner_id=owner_id,
                        title=DEFAULT_TITLE,
                        model_tag=self.models.get(
                            (bot.model if bot is not None and bot.model else None) or model
                        ).spec.name,
                        session_key=session_key,
                        bot_id=bot_id,
                    )
            except IntegrityError:
                continue  # another request created it first; read theirs
        raise InvalidRequest("Could not open the session; try again.")  # pragma: no cover

    async def reset_session(self, *, owner_id: uuid.UUID, session_key: str) -> None:
        """Unbind a session key so the next message starts a fresh conversation."""
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(Conversation)
                .where(Conversation.owner_id == owner_id, Conversation.session_key == session_key)
                .values(session_key=None)
            )

    def complete(self, request: CompletionRequest) -> CompletionStream:
        """Start a stateless generation (the client sent the whole history) and return it."""
        from .stateless import CompletionStream

        return CompletionStream(self, request)

    def turn(self, request: TurnRequest) -> TurnStream:
        """Start a turn in the background and return its handle."""
        return TurnStream(self, request)

    async def close(self) -> None:
        """Cancel running turns (their partial replies are kept) and wait for them."""
        turns = list(self.running)
        for turn in turns:
            turn.cancel()
        await asyncio.gather(*(turn.wait() for turn in turns))
        await self.locks.close()
