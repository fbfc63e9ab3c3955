"""Reading request bodies with a size limit, for the dialects that parse JSON themselves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InvalidRequest, PayloadTooLarge
from ..settings import Settings
from .errors import error_response
from .wire import has_invalid_text

T = TypeVar("T")
#: Bodies larger than this are parsed on a worker thread.
OFF_LOOP_BYTES = 64 * 1024


def too_large(limit: int, setting: str = "PARLOUR_MAX_BODY_BYTES") -> PayloadTooLarge:
    """The error for a body over the limit, saying how to raise it."""
    return PayloadTooLarge(
        f"Request body is larger than {limit} bytes; send less or raise {setting}."
    )


class BodyLimitMiddleware:
    """Refuses every body over its limit before any route reads it: PARLOUR_MAX_BODY_BYTES,
    or PARLOUR_MAX_UPLOAD_BYTES for multipart uploads under /admin/."""

    def __init__(self, app: ASGIApp, *, body_bytes: int, upload_bytes: int) -> None:
        self.app = app
        self.body_bytes = body_bytes
        self.upload_bytes = upload_bytes

    def _limit(self, request: Request) -> tuple[int, str]:
        upload = request.url.path.startswith("/admin/") and request.headers.get(
            "content-type", ""
        ).startswith("multipart/form-data")
        if upload:
            return self.upload_bytes, "PARLOUR_MAX_UPLOAD_BYTES"
        return self.body_bytes, "PARLOUR_MAX_BODY_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        limit, setting = self._limit(request)
        declared = request.headers.get("content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                await error_response(request, too_large(limit, setting))(scope, receive, send)
                return
            # The HTTP server stops at the declared length, so it is the bound.
            await self.app(scope, receive, send)
            return
        buffered = await _buffer(receive, limit)
        if buffered is None:
            await error_response(request, too_large(limit, setting))(scope, receive, send)
            return
        await self.app(scope, _replay(buffered, receive), send)


async def _buffer(receive: Receive, limit: int) -> list[Message] | None:
    """A body without a declared length, read whole, or None once it passes `limit`."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def install_body_limit(app: FastAPI, settings: Settings) -> None:
    """Apply the body limits to every route."""
    app.add_middleware(
        BodyLimitMiddleware,
        body_bytes=settings.max_body_bytes,
        upload_bytes=settings.max_upload_bytes,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing anything over `limit` bytes before reading all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def off_loop(parse: Callable[[bytes], T], raw: bytes) -> T:
    """`parse(raw)`, on a worker thread when the body is large enough to stall the loop."""
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse, raw)
    return parse(raw)


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as UTF-8 JSON, with a clear error for anything else."""
    return await off_loop(decode_json, await read_body(request, limit))


def decode_json(raw: bytes) -> Any:
    """`raw` parsed as UTF-8 JSON of valid Unicode text, or InvalidRequest saying why."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid UTF-8 (byte {exc.start}).", code="invalid_json"
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}.",
            code="invalid_json",
        ) from exc
    except RecursionError:
        raise InvalidRequest(
            "The request body nests arrays or objects too deeply; flatten it.",
            code="invalid_json",
        ) from None
    if has_invalid_text(data):
        # json accepts escapes like "\ud800" and "\u0000" that no store can hold.
        raise InvalidRequest(
            "The request body contains an unpaired surrogate escape (\\ud800-\\udfff) or "
            "NUL (\\u0000); send valid Unicode text.",
            code="invalid_json",
        )
    return data
