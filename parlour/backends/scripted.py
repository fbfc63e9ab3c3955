"""A deterministic backend for protocol tests: scripted or echoing replies, word-sized tokens."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from .base import Backend, ChatMessage, Chunk, GenerationParams

_TOKEN = re.compile(r"\s*\S+|\s+")


def scripted_tokens(text: str) -> list[str]:
    """Split text the way the scripted backend counts it: one token per word."""
    return _TOKEN.findall(text)


@dataclass(frozen=True)
class ScriptedCall:
    """What the backend was asked to do, kept so tests can inspect the context."""

    messages: tuple[ChatMessage, ...]
    params: GenerationParams
    session: str | None


class ScriptedBackend(Backend):
    """Replies with enqueued texts, else `Echo N: <last user message>` (N = user turns seen)."""

    kind = "scripted"
    exact_tokens = True

    def __init__(self, *, context_length: int = 4096, token_delay: float = 0.0) -> None:
        self._context_length = context_length
        self.token_delay = token_delay
        self.queue: deque[str] = deque()
        self.calls: list[ScriptedCall] = []
        self.tokens_generated = 0
        #: Each session's last prompt, so a follow-up reports the shared prefix as cached.
        self.session_prompts: dict[str, tuple[ChatMessage, ...]] = {}

    @property
    def context_length(self) -> int:
        return self._context_length

    def enqueue(self, *replies: str) -> None:
        """Queue replies to be returned in order before falling back to echoing."""
        self.queue.extend(replies)

    def count_tokens(self, text: str) -> int:
        return len(scripted_tokens(text))

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        # Two tokens of framing per message plus one to open the reply, like a chat template.
        return sum(self.count_tokens(m.content) + 2 for m in messages) + 1

    def reply_for(self, messages: Sequence[ChatMessage]) -> str:
        """The text this backend will answer with for these messages."""
        if self.queue:
            return self.queue.popleft()
        users = [m for m in messages if m.role == "user"]
        last = users[-1].content if users else ""
        return f"Echo {len(users)}: {last}"

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        session: str | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        self.calls.append(ScriptedCall(tuple(messages), params, session))
        prompt = self.prompt_tokens(messages)
        cached = self._cached(messages, session)
        text = self.reply_for(messages)
        produced = ""
        count = 0
        finish: str = "stop"
        for piece in scripted_tokens(text):
            if count >= params.max_tokens:
                finish = "length"
                break
            candidate = produced + piece
            hit = next((s for s in params.stop if s and s in candidate), None)
            if hit is not None:
                cut = candidate.index(hit)
                if cut > len(produced):
                    yield Chunk(text=candidate[len(produced) : cut])
                produced = candidate[:cut]
                break
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            else:
                await asyncio.sleep(0)
            count += 1
            self.tokens_generated += 1
            produced = candidate
            yield Chunk(text=piece)
        yield Chunk(
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=prompt,
            completion_tokens=count,
            cached_tokens=cached,
        )

    def _cached(self, messages: Sequence[ChatMessage], session: str | None) -> int:
        """Prompt tokens of the messages this session's previous prompt began with."""
        if session is None:
            return 0
        previous = self.session_prompts.get(session, ())
        self.session_prompts[session] = tuple(messages)
        shared = 0
        for old, new in zip(previous, messages, strict=False):
            if old != new:
                break
            shared += 1
        return sum(self.count_tokens(m.content) + 2 for m in messages[:shared])
