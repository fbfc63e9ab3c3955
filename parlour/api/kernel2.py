"""Second Me's local chat API: stateless `POST /api/kernel2/chat`, OpenAI-shaped chunks."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__, bots
from ..backends.base import ChatMessage
from ..engine import Engine, Sampling
from ..errors import InvalidRequest, NotFound, ParlourError
from ..stateless import CompletionRequest, CompletionStream
from ..store.tables import Bot
from . import sse
from .body import read_json
from .deps import EngineDep, PrincipalDep, SettingsDep
from .errors import ErrorShape
from .openai_protocol import ContentPart, Wire, usage
from .schema import json_request_body
from .wire import Int, Number, Text

router = APIRouter(tags=["second me"])

PREFIX = "/api/kernel2"
DEFAULT_TEMPERATURE = 0.1
DEFAULT_MAX_TOKENS = 2000


def error_body(error: ParlourError) -> dict[str, Any]:
    """Second Me's error object."""
    return {"success": False, "message": error.message, "code": error.status}


def kernel2_shape() -> ErrorShape:
    """Errors under /api/kernel2 use Second Me's shape."""
    return ErrorShape(
        matches=lambda path: path == PREFIX or path.startswith(PREFIX + "/"), render=error_body
    )


class Kernel2Message(Wire):
    """A message of the history."""

    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart] | None = None


class Kernel2Metadata(Wire):
    """`metadata`: retrieval and role."""

    enable_l0_retrieval: bool | None = None
    role_id: Text | None = None


class Kernel2Request(Wire):
    """The body of POST /api/kernel2/chat."""

    messages: list[Kernel2Message] = Field(min_length=1)
    metadata: Kernel2Metadata | None = None
    stream: bool | None = None
    model: Text | None = None
    temperature: Number | None = Field(default=None, ge=0, le=2)
    max_tokens: Int | None = Field(default=None, ge=1)


def _loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in {"str", "list[ContentPart]"} or "[" in item:
            continue  # the union member pydantic tried, which the client never wrote
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def parse_request(data: Any) -> Kernel2Request:
    """Validate a decoded body; every problem is named in one 400 message."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object with `messages`.")
    try:
        return Kernel2Request.model_validate(data)
    except ValidationError as exc:
        problems: list[str] = []
        for item in exc.errors():
            where = _loc(tuple(item["loc"]))
            text = f"{where}: {item['msg']}"
            if text not in problems:
                problems.append(text)
        raise InvalidRequest("Invalid request: " + "; ".join(problems) + ".") from None


def _text(message: Kernel2Message, index: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts: list[str] = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"messages[{index}].content[{j}]: only text parts are accepted, not {part.type!r}."
            )
        texts.append(part.text)
    return "\n".join(texts)


def completion_request(
    owner_id: uuid.UUID, body: Kernel2Request, role: Bot | None
) -> CompletionRequest:
    """The engine request. A role's system prompt replaces the request's, and its L0 flag,
    model, temperature and max tokens win over the request's."""
    system: list[str] = []
    history: list[ChatMessage] = []
    for index, message in enumerate(body.messages):
        text = _text(message, index)
        if message.role == "system":
            system.append(text)
        else:
            history.append(ChatMessage(message.role, text))
    if not any(m.content for m in history if m.role == "user"):
        raise InvalidRequest("messages has no user message with text: add one to be answered.")
    metadata = body.metadata or Kernel2Metadata()
    temperature = body.temperature if body.temperature is not None else DEFAULT_TEMPERATURE
    max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS
    if role is not None:
        system = [role.system_prompt]
        retrieval = role.enable_l0_retrieval
    else:
        retrieval = bool(metadata.enable_l0_retrieval)
    return CompletionRequest(
        owner_id=owner_id,
        messages=tuple(history),
        system=tuple(system),
        sampling=Sampling(max_tokens=max_tokens, temperature=temperature).with_bot(role),
        model=(role.model if role is not None and role.model else None) or body.model,
        retrieval=retrieval,
        knowledge_base_id=role.kb_id if role is not None else None,
        bot_id=role.uid if role is not None else None,
        dialect="kernel2",
    )


def fingerprint(model: str) -> str:
    """A stable `system_fingerprint` for this server version and model."""
    return "fp_" + hashlib.sha256(f"parlour {__version__} {model}".encode()).hexdigest()[:10]


def chunk(
    *, id: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    """A `chat.completion.chunk` as the seed documents it."""
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint(model),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def _next(iterator: AsyncIterator[str]) -> str:
    return await anext(iterator)


async def with_heartbeat(stream: CompletionStream, interval: float) -> AsyncIterator[str | None]:
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


async def _events(stream: CompletionStream, model: str, interval: float) -> AsyncIterator[str]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        yield sse.event(
            chunk(id=cid, created=created, model=model, delta={"role": "assistant", "content": ""})
        )
        try:
            async for delta in with_heartbeat(stream, interval):
                if delta is None:
                    yield ": heartbeat\n\n"
                else:
                    yield sse.event(
                        chunk(id=cid, created=created, model=model, delta={"content": delta})
                    )
            result = await stream.result()
        except ParlourError as exc:
            yield sse.event(error_body(exc))
            yield sse.DONE
            return
        yield sse.event(
            chunk(id=cid, created=created, model=model, delta={}, finish=result.finish_reason)
        )
        yield sse.DONE
    finally:
        # Also reached when the client disconnects: stop generating.
        stream.cancel()


async def _role(engine: Engine, role_id: str | None) -> Bot | None:
    if role_id is None or role_id == "":
        return None
    async with engine.db.read() as session, session.begin():
        found = await bots.find_bot(session, role_id)
    if found is None:
        raise NotFound(f"Role {role_id} not found; GET /v1/bots lists the roles' uids.")
    return found


@router.post(
    f"{PREFIX}/chat",
    summary="Second Me chat: stateless, OpenAI-compatible, streaming by default.",
    openapi_extra=json_request_body(Kernel2Request),
    responses={
        200: {
            "description": "An event stream of chat.completion.chunk objects ending with "
            "[DONE] (`: heartbeat` comments while waiting), or with stream=false a "
            "chat.completion object.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        400: {"description": '`{"success": false, "message": "…", "code": 400}`'},
        404: {"description": "Unknown role_id."},
        503: {"description": "The model is not loaded yet."},
    },
)
async def chat(
    request: Request, engine: EngineDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """Answer the last message of the history the client sends."""
    body = parse_request(await read_json(request, settings.max_body_bytes))
    metadata = body.metadata or Kernel2Metadata()
    role = await _role(engine, metadata.role_id)
    stream = engine.complete(completion_request(principal.owner_id, body, role))
    try:
        await stream.started()
    except BaseException:
        stream.cancel()
        raise
    model = stream.model or ""
    if body.stream is not False:
        return sse.response(
            _events(stream, model, settings.heartbeat_seconds),
            closing=lambda e: [sse.event(error_body(e)), sse.DONE],
        )
    try:
        async for _ in stream:
            pass
        result = await stream.result()
    finally:
        stream.cancel()
    return JSONResponse(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": result.model,
            "system_fingerprint": fingerprint(result.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(result.prompt_tokens, result.completion_tokens),
        }
    )
