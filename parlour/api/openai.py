"""The OpenAI-compatible dialect with server-side sessions keyed by `x-session-key`."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import Engine, Sampling, TurnRequest, TurnStream
from ..errors import InvalidRequest, ParlourError
from . import sse
from .body import read_json
from .deps import EngineDep, ModelsDep, PrincipalDep, SettingsDep
from .errors import ErrorShape
from .openai_protocol import (
    ChatCompletionRequest,
    RequestMessage,
    chunk,
    completion,
    error_body,
    parse_request,
    usage,
)
from .schema import json_request_body

router = APIRouter(tags=["openai"])

HELP_TEXT = (
    "Commands:\n"
    "/new - start a fresh conversation under this session key (the old one is kept)\n"
    "/help - show this list"
)

#: session_turn() finds the conversation from the session key.
NO_CONVERSATION = uuid.UUID(int=0)

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models", "/v1/completions", "/v1/embeddings")


def openai_shape() -> ErrorShape:
    """Errors on this dialect's paths use OpenAI's error object."""
    return ErrorShape(
        matches=lambda path: path.rstrip("/") in OPENAI_PATHS or path.startswith("/v1/models/"),
        render=error_body,
    )


def _session_key(value: str | None) -> str:
    if value is None or value == "":
        raise InvalidRequest(
            "Missing required header: x-session-key",
            param="x-session-key",
            code="missing_session_key",
        )
    # The server decodes header bytes as latin-1, but clients such as curl send UTF-8.
    with contextlib.suppress(UnicodeError):
        value = value.encode("latin-1").decode("utf-8")
    if len(value) > 256 or not value.isprintable():
        raise InvalidRequest(
            "Invalid x-session-key: use 1 to 256 printable characters.",
            param="x-session-key",
            code="invalid_session_key",
        )
    return value


def _text(message: RequestMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"Unsupported content part type {part.type!r}: only 'text' parts are accepted.",
                param=f"messages[{index}].content[{j}].type",
                code="invalid_value",
            )
        texts.append(part.text)
    return "\n".join(texts)


def new_turn(body: ChatCompletionRequest) -> tuple[str, str | None]:
    """The user text of the new turn and the system prompt the request sets, if any."""
    messages = body.messages
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    system = [_text(m, i) for i, m in enumerate(messages) if m.role in ("system", "developer")]
    users = [_text(m, i) for i, m in enumerate(messages) if i > last_assistant and m.role == "user"]
    if not users:
        raise InvalidRequest(
            "The new turn has no user message: send at least one message with role 'user' "
            "after the last assistant message.",
            param="messages",
        )
    if not any(users):
        raise InvalidRequest(
            "The new turn's user messages are empty: send some text to be answered.",
            param="messages",
            code="invalid_value",
        )
    return "\n\n".join(users), ("\n\n".join(system) if system else None)


def _sampling(body: ChatCompletionRequest) -> Sampling:
    return Sampling(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_sequences,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )


def _command_reply(body: ChatCompletionRequest, model: str, text: str) -> Response:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        return JSONResponse(
            completion(
                id=cid,
                created=created,
                model=model,
                content=text,
                finish_reason="stop",
                prompt_tokens=0,
                completion_tokens=0,
            )
        )

    async def events() -> AsyncIterator[str]:
        yield sse.event(
            chunk(id=cid, created=created, model=model, delta={"role": "assistant", "content": ""})
        )
        yield sse.event(chunk(id=cid, created=created, model=model, delta={"content": text}))
        yield sse.event(chunk(id=cid, created=created, model=model, finish_reason="stop"))
        if body.include_usage:
            yield sse.event(
                chunk(id=cid, created=created, model=model, usage=usage(0, 0), with_choice=False)
            )
        yield sse.DONE

    return sse.response(events(), closing=closing)


def closing(error: ParlourError) -> list[str]:
    """How an OpenAI stream ends when the server shuts down: an error event, then [DONE]."""
    return [sse.event(error_body(error)), sse.DONE]


async def _stream(turn: TurnStream, body: ChatCompletionRequest, model: str) -> AsyncIterator[str]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        yield sse.event(
            chunk(id=cid, created=created, model=model, delta={"role": "assistant", "content": ""})
        )
        try:
            async for delta in turn:
                yield sse.event(
                    chunk(id=cid, created=created, model=model, delta={"content": delta})
                )
        except ParlourError as exc:
            yield sse.event(error_body(exc))
            yield sse.DONE
            return
        result = await turn.result()
        yield sse.event(
            chunk(id=cid, created=created, model=model, finish_reason=result.finish_reason)
        )
        if body.include_usage:
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
    finally:
        # Reached when the client disconnects too: stop generating, keep the partial reply.
        turn.cancel()


async def _complete(turn: TurnStream) -> Response:
    try:
        async for _ in turn:
            pass
        result = await turn.result()
    finally:
        turn.cancel()
    return JSONResponse(
        completion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=result.model,
            content=result.assistant_message.content,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
    )


@router.post(
    "/v1/chat/completions",
    summary="Chat with server-side history: send only the new message with x-session-key.",
    openapi_extra=json_request_body(ChatCompletionRequest),
    responses={
        200: {
            "description": "A chat.completion object, or with stream=true an event stream of "
            "chat.completion.chunk objects ending with [DONE].",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        400: {"description": "Invalid request (OpenAI error object)."},
        413: {"description": "Request body too large."},
        503: {"description": "Model not loaded yet."},
    },
)
async def chat_completions(
    request: Request,
    engine: EngineDep,
    models: ModelsDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    x_session_key: str | None = Header(default=None),
) -> Response:
    """Continue the session named by x-session-key with the request's new messages."""
    session_key = _session_key(x_session_key)
    body = parse_request(await read_json(request, settings.max_body_bytes))
    content, system_prompt = new_turn(body)
    model = models.ready_model(body.model)
    command = content.strip()
    if command == "/new":
        await engine.reset_session(owner_id=principal.owner_id, session_key=session_key)
        return _command_reply(body, model.spec.name, "Started a new session.")
    if command == "/help":
        return _command_reply(body, model.spec.name, HELP_TEXT)
    turn = await start_turn(
        engine,
        owner_id=principal.owner_id,
        session_key=session_key,
        body=body,
        content=content,
        system_prompt=system_prompt,
    )
    if body.stream:
        try:
            await turn.first_output()
        except BaseException:
            turn.cancel()
            raise
        return sse.response(_stream(turn, body, turn.model or model.spec.name), closing=closing)
    return await _complete(turn)


async def start_turn(
    engine: Engine,
    *,
    owner_id: uuid.UUID,
    session_key: str,
    body: ChatCompletionRequest,
    content: str,
    system_prompt: str | None,
) -> TurnStream:
    """Open (or create) the session's conversation and start a turn on it."""
    return await engine.session_turn(
        TurnRequest(
            owner_id=owner_id,
            conversation_id=NO_CONVERSATION,
            content=content,
            sampling=_sampling(body),
            model=body.model if body.model and engine.models.knows(body.model) else None,
            system_prompt=system_prompt,
            user_id=body.user,
            dialect="openai",
        ),
        session_key=session_key,
        model=body.model,
    )


@router.get("/v1/models", summary="The configured models and their aliases.")
async def list_models(models: ModelsDep, principal: PrincipalDep) -> dict[str, Any]:
    """OpenAI's model list."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": owner}
            for name, created, owner in models.listing()
        ],
    }
