"""A turn: lock the conversation, persist the user message, fit the context, generate, persist."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from . import bots, knowledge, usage
from .backends.base import ChatMessage, FinishReason, GenerationParams
from .context import HistoryItem, check_fits, fit_with_knowledge, system_messages
from .errors import BackendError, InvalidRequest, NotFound, ParlourError
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


class TurnCancelled(ParlourError):
    """The client went away before the turn started; nothing was written."""

    status = 499
    code = "cancelled"


class TurnStream:
    """A running turn: iterate it for text deltas, then await result(); cancel() stops it."""

    def __init__(self, engine: Engine, request: TurnRequest) -> None:
        self._engine = engine
        self._request = request
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()
        self._output = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._result: asyncio.Future[TurnResult] = loop.create_future()
        self._error: ParlourError | None = None
        self._cancel_requested = False
        self._interruptible = True
        self.model: str | None = None
        self._task = asyncio.create_task(self._run())
        engine.running.add(self)
        self._task.add_done_callback(lambda _task: engine.running.discard(self))

    async def started(self) -> None:
        """Wait until the user message is persisted and generation may begin."""
        await asyncio.shield(self._started)

    async def first_output(self) -> None:
        """Wait for the first text, or the end; raise the turn's error if it failed before any.

        Streaming edges wait for this before sending headers, so an upstream that is
        down still gets a proper HTTP status instead of an error event.
        """
        await self._output.wait()
        if self._error is not None and self._deltas.qsize() <= 1:
            raise self._error

    def _emit(self, delta: str | None) -> None:
        self._deltas.put_nowait(delta)
        self._output.set()

    async def result(self) -> TurnResult:
        """Wait for the turn to end and return it."""
        return await asyncio.shield(self._result)

    def cancel(self) -> None:
        """Stop the turn: before it starts nothing is written; during generation the
        partial reply is kept as `cancelled`."""
        if self._task.done() or self._cancel_requested:
            return
        self._cancel_requested = True
        if self._interruptible:
            self._task.cancel()

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            delta = await self._deltas.get()
            if delta is None:
                break
            yield delta
        if self._error is not None:
            raise self._error

    def _fail(self, error: ParlourError) -> None:
        self._error = error
        for future in (self._started, self._result):
            if not future.done():
                future.set_exception(error)
                # Retrieved here so an unawaited future never logs a warning.
                future.exception()
        self._emit(None)

    async def _run(self) -> None:
        try:
            async with self._engine.locks.hold(self._request.conversation_id):
                self._interruptible = False
                await self._turn()
        except asyncio.CancelledError:
            self._fail(TurnCancelled("The client went away before the turn started."))
        except ParlourError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("turn failed")
            self._fail(BackendError(f"The turn failed: {type(exc).__name__}: {exc}"))

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
        self._started.set_result(None)

        max_tokens = min(budget, backend.context_length - fitted.prompt_tokens)
        params = plan.sampling.params(max(1, max_tokens))
        pieces: list[str] = []
        finish: FinishReason = "stop"
        prompt_tokens, completion_tokens = fitted.prompt_tokens, 0
        began = time.perf_counter()
        self._interruptible = True
        generation = backend.stream(fitted.messages, params, session=str(conversation.id))
        try:
            if self._cancel_requested:
                raise asyncio.CancelledError
            async for chunk in generation:
                if chunk.text:
                    pieces.append(chunk.text)
                    self._emit(chunk.text)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                    prompt_tokens = chunk.prompt_tokens or prompt_tokens
                    completion_tokens = chunk.completion_tokens
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            finish = "cancelled"
        except ParlourError as exc:
            finish = "error"
            self._error = exc
        except Exception as exc:
            log.exception("generation failed")
            finish = "error"
            self._error = BackendError(f"Generation failed: {type(exc).__name__}: {exc}")
        finally:
            self._interruptible = False
            await generation.aclose()
        elapsed_ms = int((time.perf_counter() - began) * 1000)
        text = "".join(pieces)
        if finish in ("cancelled", "error"):
            completion_tokens = backend.count_tokens(text)

        async with engine.db.session() as session, session.begin():
            assistant = await queries.append_message(
                session,
                conversation,
                role="assistant",
                content=text,
                token_count=backend.count_tokens(text),
                model_tag=model.spec.name,
                inference_time_ms=elapsed_ms,
                finish_reason=finish,
            )
            await usage.record(
                session,
                owner_id=request.owner_id,
                bot_id=request.bot_id or (bot.uid if bot is not None else None),
                model=model.spec.name,
                user_id=request.user_id,
                dialect=request.dialect,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        self._result.set_result(
            TurnResult(
                conversation=conversation,
                user_message=user_message,
                assistant_message=assistant,
                model=model.spec.name,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        )
        self._emit(None)


class Engine:
    """The shared core every dialect calls: conversations, sessions and turns."""

    def __init__(self, *, db: Database, models: ModelRegistry) -> None:
        self.db = db
        self.models = models
        self.locks = turn_locks(db.url, is_sqlite=db.is_sqlite)
        self.running: set[TurnStream | CompletionStream] = set()

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
        await asyncio.gather(*(turn._task for turn in turns), return_exceptions=True)
        await self.locks.close()
