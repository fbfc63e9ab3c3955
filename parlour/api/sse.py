"""Server-Sent Events shared by the streaming dialects."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: Any) -> str:
    """One `data:` event carrying JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def response(body: Any) -> StreamingResponse:
    """A text/event-stream response that proxies must not buffer."""
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


def named(kind: str, data: Any) -> str:
    """One event with an `event:` name and a JSON `data:` line."""
    return f"event: {kind}\n{event(data)}"
