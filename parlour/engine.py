"""A turn: lock the conversation, persist the user message, fit the context, generate, persist."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from . import bots, knowledge, usage
from .backends.base import ChatMessage, FinishReason, GenerationParams
from .context import HistoryItem, check_fits, fit_with_knowledge, system_messages
from .errors import InvalidRequest, NotFound, ParlourError
from .generation import GenerationStream
from .history import HistoryCache
from .knowledge import Hit
from .locks import turn_locks
from .models import LoadedModel, ModelRegistry
from .observe import Observer
from .store import queries
from .store.db import Database
from .store.tables import Bot, Conversation, Message, utcnow

if TYPE_CHECKING:
    from .stateless import CompletionRequest, CompletionStream

log = logging.getLogger(__name__)

DEFAULT_TITLE = "New conversation"
#: Session keys whose conversation this process remembers (forgotten all at once when full).
SESSION_CACHE_SIZE = 100_000
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
    #: When set, the turn goes ahead only while the conversation is still bound to this
    #: session key; otherwise it fails with SessionMoved before writing anything.
    session_key: str | None = None


class SessionMoved(ParlourError):
    """The session key no longer names the conversation a turn was started on."""

    status = 409
    code = "session_moved"


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
        super().__init__(engine.running, engine.observer)

    async def _work(self) -> None:
        asked = time.perf_counter()
        async with self._engine.locks.hold(self._request.conversation_id):
            self._watch.lock_waited(time.perf_counter() - asked)
            self._interruptible = False
            await self._turn()

    async def _turn(self) -> None:
        engine, request = self._engine, self._request
        if self._cancel_requested:
            raise asyncio.CancelledError
        # Core statements on one connection per transaction: this runs for every message.
        async with engine.db.begin() as conn:
            found = await queries.conversation_for_turn(
                conn, request.owner_id, request.conversation_id
            )
            if request.session_key is not None and (
                found is None or found[0].session_key != request.session_key
            ):
                raise SessionMoved("The session moved to another conversation; try again.")
            if found is None:
                raise NotFound("Conversation not found")
            conversation, last_position = found
            bot, hits = await _bot_and_knowledge(engine.db, conversation.bot_id, request.content)
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
            changes: dict[str, str] = {}
            if request.system_prompt is not None and request.system_prompt != (
                conversation.system_prompt
            ):
                changes["system_prompt"] = request.system_prompt
            if not conversation.title or conversation.title == DEFAULT_TITLE:
                title = " ".join(request.content.split())[:TITLE_LENGTH]
                if title:
                    changes["title"] = title
            # Every message costs at least one token, so no more messages than the prompt
            # has tokens of room can fit: older ones need not be read.
            limit = backend.context_length - budget
            last = last_position if last_position is not None else -1
            rows = engine.history.get(conversation.id, last, limit)
            loaded = rows is None
            if rows is None:
                rows = await queries.recent_history(conn, conversation.id, limit=limit)
            now = utcnow()
            user_message = await queries.insert_message(
                conn,
                conversation_id=conversation.id,
                position=last + 1,
                role="user",
                content=request.content,
                token_count=backend.count_tokens(request.content),
                now=now,
            )
            await queries.touch_conversation(conn, conversation, now, **changes)
        if loaded:
            engine.history.put(conversation.id, last, rows, complete=len(rows) < limit, keep=limit)
        engine.history.append(
            conversation.id,
            last,
            ("user", user_message.content, user_message.token_count),
            user_message.position,
            keep=limit,
        )
        fitted, _kept = fit_with_knowledge(
            backend,
            parts=plan.system,
            hits=hits,
            history=[
                HistoryItem(ChatMessage(role, content), tokens)  # type: ignore[arg-type]
                for role, content, tokens in rows
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
        async with engine.db.begin() as conn:
            now = utcnow()
            assistant = await queries.insert_message(
                conn,
                conversation_id=conversation.id,
                # The turn lock is still held (across processes too), so nothing else
                # has written to this conversation since the user message.
                position=user_message.position + 1,
                role="assistant",
                content=generated.text,
                token_count=backend.count_tokens(generated.text),
                model_tag=model.spec.name,
                inference_time_ms=generated.elapsed_ms,
                finish_reason=generated.finish_reason,
                now=now,
            )
            await queries.touch_conversation(conn, conversation, now)
            await usage.add(
                conn,
                owner_id=request.owner_id,
                bot_id=request.bot_id or (bot.uid if bot is not None else None),
                model=model.spec.name,
                user_id=request.user_id,
                dialect=request.dialect,
                prompt_tokens=generated.prompt_tokens,
                completion_tokens=generated.completion_tokens,
                now=now,
            )
        engine.history.append(
            conversation.id,
            user_message.position,
            ("assistant", assistant.content, assistant.token_count),
            assistant.position,
            keep=limit,
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


async def _bot_and_knowledge(
    db: Database, bot_id: uuid.UUID | None, content: str | None
) -> tuple[Bot | None, list[Hit]]:
    """A bot and the knowledge it retrieves for `content` (None: no retrieval); a read
    session is opened only when there is a bot."""
    if bot_id is None:
        return None, []
    async with db.read() as session, session.begin():
        bot = await session.get(Bot, bot_id)
        hits = (
            await knowledge.retrieve(session, content, kb_id=bot.kb_id)
            if bot is not None and bot.enable_l0_retrieval and content is not None
            else []
        )
    return bot, hits


class Engine:
    """The shared core every dialect calls: conversations, sessions and turns."""

    def __init__(self, *, db: Database, models: ModelRegistry) -> None:
        self.db = db
        self.models = models
        self.locks = turn_locks(db.url, is_sqlite=db.is_sqlite)
        self.running: set[GenerationStream[object]] = set()
        #: Told about every generation (parlour.metrics sets one that records them).
        self.observer = Observer()
        self.history = HistoryCache()
        #: (owner, session key) -> conversation id, as last seen by this process; a turn
        #: re-checks the binding in its own transaction (see TurnRequest.session_key).
        self._sessions: dict[tuple[uuid.UUID, str], uuid.UUID] = {}

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
            async with self.db.begin_read() as conn:
                found = await queries.conversation_for_session_key(conn, owner_id, session_key)
            bot, _ = await _bot_and_knowledge(self.db, bot_id, None)
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

    async def session_turn(
        self, request: TurnRequest, *, session_key: str, model: str | None
    ) -> TurnStream:
        """Start a turn on the conversation bound to `session_key` (created on first use, as
        session_conversation() does; `request.conversation_id` is ignored) and wait until
        its user message is stored.

        The binding is remembered in this process, so a turn needs no lookup of its own;
        the turn re-checks it in the transaction that stores the message, so a key that
        /new moved or whose conversation was deleted, here or in another process, costs
        a retry and never puts a message in the wrong conversation.
        """
        key = (request.owner_id, session_key)
        for attempt in range(3):
            conversation_id = self._sessions.get(key) if attempt == 0 else None
            if conversation_id is None:
                conversation_id = (
                    await self.session_conversation(
                        owner_id=request.owner_id,
                        session_key=session_key,
                        model=model,
                        content=request.content,
                        system_prompt=request.system_prompt,
                        sampling=request.sampling,
                    )
                ).id
                if len(self._sessions) >= SESSION_CACHE_SIZE:
                    self._sessions.clear()
                self._sessions[key] = conversation_id
            turn = self.turn(
                replace(request, conversation_id=conversation_id, session_key=session_key)
            )
            try:
                await turn.started()
            except SessionMoved:
                self._sessions.pop(key, None)
                continue
            except BaseException:
                turn.cancel()
                raise
            return turn
        raise InvalidRequest("Could not open the session; try again.")  # pragma: no cover

    async def reset_session(self, *, owner_id: uuid.UUID, session_key: str) -> None:
        """Unbind a session key so the next message starts a fresh conversation."""
        self._sessions.pop((owner_id, session_key), None)
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
