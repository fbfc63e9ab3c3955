"""Stateless generation: the client sends the whole history and nothing but usage is stored.

Used by the dialects that keep no conversations (Second Me's kernel2, the Bot API). It fits
the context and stops on disconnect exactly like a persisted turn, and adds knowledge base
retrieval under `Reference knowledge:`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import knowledge, usage
from .backends.base import ChatMessage, FinishReason
from .context import HistoryItem, fit_with_knowledge
from .engine import Sampling
from .errors import InvalidRequest
from .generation import GenerationStream
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


class CompletionStream(GenerationStream[CompletionResult]):
    """A running stateless generation: iterate it for text deltas, then await result()."""

    def __init__(self, engine: Engine, request: CompletionRequest) -> None:
        self._engine = engine
        self._request = request
        super().__init__(engine.running, engine.observer)

    async def _work(self) -> None:
        await self._complete()

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
        self._begin()

        max_tokens = max(1, min(requested, backend.context_length - fitted.prompt_tokens))
        generated = await self._generate(
            backend,
            fitted.messages,
            request.sampling.params(max_tokens),
            prompt_tokens=fitted.prompt_tokens,
        )
        async with engine.db.session() as session, session.begin():
            await usage.record(
                session,
                owner_id=request.owner_id,
                bot_id=request.bot_id,
                model=model.spec.name,
                user_id=request.user_id,
                dialect=request.dialect,
                prompt_tokens=generated.prompt_tokens,
                completion_tokens=generated.completion_tokens,
            )
        self._finish(
            CompletionResult(
                model=model.spec.name,
                text=generated.text,
                finish_reason=generated.finish_reason,
                prompt_tokens=generated.prompt_tokens,
                completion_tokens=generated.completion_tokens,
                knowledge=tuple(hits),
            )
        )
