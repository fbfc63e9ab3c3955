"""Server-Sent Events shared by the streaming dialects."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse

from ..turns.stream import Turn

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: Any) -> str:
    """One `data:` event carrying JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def response(body: Any) -> StreamingResponse:
    """A text/event-stream response that proxies must not buffer."""
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def stream(
    turn: Turn,
    events: Callable[[Turn], AsyncIterator[str]],
    *,
    wait_for_output: bool = True,
) -> StreamingResponse:
    """Stream `events(turn)` once the turn has output (or, without `wait_for_output`, has
    started), so errors before that still get their HTTP status; the turn is cancelled when
    the stream ends, however it ends (a client that goes away included)."""
    try:
        await (turn.first_output() if wait_for_output else turn.started())
    except BaseException:
        turn.cancel()
        raise

    async def body() -> AsyncIterator[str]:
        async with turn:
            async for item in events(turn):
                yield item

    return response(body())


def documented(
    description: str, errors: Mapping[int | str, str | dict[str, Any]]
) -> dict[int | str, Any]:
    """OpenAPI `responses` of a route that answers JSON or, when asked, an event stream."""
    described: dict[int | str, Any] = {
        200: {
            "description": description,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }
    for status, error in errors.items():
        described[status] = {"description": error} if isinstance(error, str) else error
    return described


def named(kind: str, data: Any) -> str:
    """One event with an `event:` name and a JSON `data:` line."""
    return f"event: {kind}\n{event(data)}"
