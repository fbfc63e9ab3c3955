"""Stateless generation: the client sends the whole history and nothing but usage is stored.

Used by the dialects that keep no conversations (Second Me's kernel2, the Bot API). It fits
the context and stops on disconnect exactly like a persisted turn, and adds knowledge base
retrieval under `Reference knowledge:`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import knowledge, usage
from .backends.base import ChatMessage, FinishReason
from .context import HistoryItem, fit_with_knowledge
from .engine import Sampling, TurnCancelled
from .errors import BackendError, InvalidRequest, ParlourError
from .knowledge import Hit

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletionRequest:
    """One stateless generation."""

    owner_id: uuid.UUID
    #: The conversation so far without system messages, oldest first; normally ends with
    #: the user's new message.
    messages: tuple[ChatMessage, ...]
    #: System prompt parts in order (a bot's first); joined with blank lines.
    system: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    model: str | None = None
    #: Search a knowledge base with the last user message and add the best chunks.
    retrieval: bool = False
    #: The knowledge base to search; None searches the one named knowledge.DEFAULT_KB.
    knowledge_base_id: uuid.UUID | None = None
    bot_id: uuid.UUID | None = None
    #: The end user the request names, recorded with the usage figures.
    user_id: str | None = None
    dialect: str | None = None


@dataclass(frozen=True)
class CompletionResult:
    """How a stateless generation ended."""

    model: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    knowledge: tuple[Hit, ...] = ()


def last_user_text(messages: Sequence[ChatMessage]) -> str:
    """The newest user message's text, the query for retrieval."""
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


class CompletionStream:
    """A running stateless generation: iterate it for text deltas, then await result()."""

    def __init__(self, engine: Engine, request: CompletionRequest) -> None:
        self._engine = engine
        self._request = request
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()
        self._output = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._result: asyncio.Future[CompletionResult] = loop.create_future()
        self._error: ParlourError | None = None
        self._cancel_requested = False
        self._interruptible = True
        self.model: str | None = None
        self._task = asyncio.create_task(self._run())
        engine.running.add(self)
        self._task.add_done_callback(lambda _task: engine.running.discard(self))

    async def started(self) -> None:
        """Wait until the context is built and generation begins; raises request errors."""
        await asyncio.shield(self._started)

    async def first_output(self) -> None:
        """Wait for the first text, or the end; raise the error if it failed before any."""
        await self._output.wait()
        if self._error is not None and self._deltas.qsize() <= 1:
            raise self._error

    async def result(self) -> CompletionResult:
        """Wait for the end and return it."""
        return await asyncio.shield(self._result)

    def cancel(self) -> None:
        """Stop generating; usage of what was generated is still recorded."""
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

    def _emit(self, delta: str | None) -> None:
        self._deltas.put_nowait(delta)
        self._output.set()

    def _fail(self, error: ParlourError) -> None:
        self._error = error
        for future in (self._started, self._result):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved so an unawaited future never logs a warning
        self._emit(None)

    async def _run(self) -> None:
        try:
            await self._complete()
        except asyncio.CancelledError:
            self._fail(TurnCancelled("The client went away before generation started."))
        except ParlourError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("completion failed")
            self._fail(BackendError(f"The completion failed: {type(exc).__name__}: {exc}"))

    async def _retrieve(self) -> list[Hit]:
        request = self._request
        if not request.retrieval:
            return []
        async with self._engine.db.read() as session, session.begin():
            return await knowledge.retrieve(
                session, last_user_text(request.messages), kb_id=request.knowledge_base_id
            )

    async def _complete(self) -> None:
        engine, request = self._engine, self._request
        if not request.messages:
            raise InvalidRequest(
                "There is nothing to answer: send at least one user message.", param="messages"
            )
        model = engine.models.ready_model(request.model)
        backend = model.backend
        self.model = model.spec.name
        hits = await self._retrieve()
        requested = request.sampling.max_tokens or model.spec.max_tokens
        # Keep at least half the window for the conversation; the reply may still use
        # whatever room is left after it.
        reserve = min(requested, max(1, backend.context_length // 2))
        *earlier, new = request.messages
        fitted, kept = fit_with_knowledge(
            backend,
            parts=request.system,
            hits=hits,
            history=[HistoryItem(m, backend.count_tokens(m.content)) for m in earlier],
            new=new,
            reply_budget=reserve,
        )
        hits = hits[:kept]
        if self._cancel_requested:
            raise asyncio.CancelledError
        self._started.set_result(None)

        max_tokens = max(1, min(requested, backend.context_length - fitted.prompt_tokens))
        params = request.sampling.params(max_tokens)
        pieces: list[str] = []
        finish: FinishReason = "stop"
        prompt_tokens, completion_tokens = fitted.prompt_tokens, 0
        generation = backend.stream(fitted.messages, params)
        try:
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
            finish, self._error = "error", exc
        except Exception as exc:
            log.exception("generation failed")
            finish = "error"
            self._error = BackendError(f"Generation failed: {type(exc).__name__}: {exc}")
        finally:
            self._interruptible = False
            await generation.aclose()
        text = "".join(pieces)
        if finish in ("cancelled", "error"):
            completion_tokens = backend.count_tokens(text)

        async with engine.db.session() as session, session.begin():
            await usage.record(
                session,
                owner_id=request.owner_id,
                bot_id=request.bot_id,
                model=model.spec.name,
                user_id=request.user_id,
                dialect=request.dialect,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        self._result.set_result(
            CompletionResult(
                model=model.spec.name,
                text=text,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                knowledge=tuple(hits),
            )
        )
        self._emit(None)
