"""Server-Sent Events shared by the streaming dialects."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

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


def response(body: AsyncIterator[str], *, closing: Closing) -> StreamingResponse:
    """A text/event-stream response that proxies must not buffer; on shutdown it ends with
    `closing(error)`: the dialect's error event and end marker."""
    return EventStream(body, closing=closing)
