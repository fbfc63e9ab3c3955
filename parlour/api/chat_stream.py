"""A turn as a `chat.completion` object or chunk stream: the answer of both dialects that
speak OpenAI's chat completions (the OpenAI one and Second Me's kernel2)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import ParlourError
from ..turns.request import TurnResult
from ..turns.stream import Turn
from . import sse
from .openai_protocol import completion, usage

#: Builds one `chat.completion.chunk` from its keyword fields, as a dialect writes it.
ChunkWriter = Callable[..., dict[str, Any]]

#: An SSE comment that keeps a quiet stream's connection open.
HEARTBEAT = ": heartbeat\n\n"


def completion_id() -> str:
    """A new `chatcmpl-…` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_of(result: TurnResult) -> dict[str, Any]:
    """The `chat.completion` object of a finished turn."""
    return completion(
        id=completion_id(),
        created=int(time.time()),
        model=result.model,
        content=result.text,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )


async def _next(iterator: AsyncIterator[str]) -> str:
    return await anext(iterator)


async def with_heartbeat(stream: Turn, interval: float) -> AsyncIterator[str | None]:
    """The stream's deltas, with None each time `interval` seconds pass without one."""
    iterator = aiter(stream)
    pending: asyncio.Task[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.create_task(_next(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        if pending is not None:
            pending.cancel()


def chunk_events(
    *,
    chunk: ChunkWriter,
    render_error: Callable[[ParlourError], Any],
    include_usage: bool = False,
    heartbeat: float | None = None,
) -> Callable[[Turn], AsyncIterator[str]]:
    """A turn's events: the role, each delta, the finish reason, usage when asked, then
    [DONE]; with `heartbeat`, a comment each time that many seconds pass without a delta.
    An error ends the stream as the dialect's error event and [DONE]."""

    async def events(turn: Turn) -> AsyncIterator[str]:
        cid, created, model = completion_id(), int(time.time()), turn.model or ""
        yield sse.event(
            chunk(id=cid, created=created, model=model, delta={"role": "assistant", "content": ""})
        )
        deltas: AsyncIterator[str | None] = aiter(turn)
        if heartbeat is not None:
            deltas = with_heartbeat(turn, heartbeat)
        try:
            async for delta in deltas:
                if delta is None:
                    yield HEARTBEAT
                else:
                    yield sse.event(
                        chunk(id=cid, created=created, model=model, delta={"content": delta})
                    )
            result = await turn.result()
        except ParlourError as exc:
            yield sse.event(render_error(exc))
            yield sse.DONE
            return
        yield sse.event(
            chunk(id=cid, created=created, model=model, finish_reason=result.finish_reason)
        )
        if include_usage:
            yield sse.event(
                chunk(
                    id=cid,
                    created=created,
                    model=model,
                    usage=usage(result.prompt_tokens, result.completion_tokens),
                    with_choice=False,
                )
            )
        yield sse.DONE

    return events
