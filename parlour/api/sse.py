"""Server-Sent Events shared by the streaming dialects."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import ParlourError
from ..turns.stream import Turn
from .shutdown import Closing, until_stopped

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: Any) -> str:
    """One `data:` event carrying JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An event stream that ends with `closing`'s events when the server shuts down."""

    def __init__(self, body: AsyncIterator[str], *, closing: Closing) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.events = body
        self.closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        stopping = getattr(app.state, "stopping", None) if app is not None else None
        if stopping is not None:
            self.body_iterator = until_stopped(self.events, stopping, self.closing)
        await super().__call__(scope, receive, send)


def ending(render: Callable[[ParlourError], Any]) -> Closing:
    """How a stream of the dialects that send `data: [DONE]` ends on shutdown: the error
    rendered as that dialect writes it, then [DONE]."""
    return lambda error: [event(render(error)), DONE]


def response(body: AsyncIterator[str], *, closing: Closing) -> StreamingResponse:
    """A text/event-stream response that proxies must not buffer; on shutdown it ends with
    `closing(error)`: the dialect's error event and end marker."""
    return EventStream(body, closing=closing)


async def stream(
    turn: Turn,
    events: Callable[[Turn], AsyncIterator[str]],
    *,
    closing: Closing,
    wait_for_output: bool = True,
) -> StreamingResponse:
    """Stream `events(turn)` once the turn has output (or, without `wait_for_output`, has
    started), so errors before that still get their HTTP status; the turn is cancelled when
    the stream ends, however it ends (a client that goes away, a server that shuts down)."""
    try:
        await (turn.first_output() if wait_for_output else turn.started())
    except BaseException:
        turn.cancel()
        raise

    async def body() -> AsyncIterator[str]:
        async with turn:
            async for item in events(turn):
                yield item

    return response(body(), closing=closing)


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
