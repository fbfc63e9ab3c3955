"""The OpenAI-compatible dialect with server-side sessions keyed by `x-session-key`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..backends.base import ChatMessage, Role
from ..errors import InvalidRequest
from ..turns.request import Sampling, Session, TurnRequest
from ..turns.stream import Turn
from . import sse
from .chat_stream import chunk_events, completion_id, completion_of
from .deps import EngineDep, ModelsDep, PrincipalDep, SettingsDep
from .errors import DialectRouter
from .guard import generation
from .openai_protocol import (
    ChatCompletionRequest,
    RequestMessage,
    chunk,
    completion,
    error_body,
    usage,
)
from .openai_sessions import earlier_messages, read_session_request, stateless_request
from .schema import json_request_body

router = DialectRouter(limit_headers=True, tags=["openai"], render_error=error_body)

HELP_TEXT = (
    "Commands:\n"
    "/new - start a fresh conversation under this session key (the old one is kept)\n"
    "/help - show this list"
)


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


def new_turn(body: ChatCompletionRequest) -> tuple[str, tuple[str, ...]]:
    """The user text of the new turn and the system prompt parts the request sets."""
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
    return "\n\n".join(users), tuple(system)


def request_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    """The request's system, user and assistant messages as text (`developer` is a system
    message; tool messages are left out)."""
    roles: dict[str, Role] = {
        "system": "system",
        "developer": "system",
        "user": "user",
        "assistant": "assistant",
    }
    return [
        ChatMessage(roles[m.role], _text(m, i))
        for i, m in enumerate(body.messages)
        if m.role in roles
    ]


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
    cid, created = completion_id(), int(time.time())
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

    return sse.response(events(), closing=CLOSING)


#: How an OpenAI stream ends when the server shuts down: an error event, then [DONE].
CLOSING = sse.ending(error_body)


async def _complete(turn: Turn) -> Response:
    async with turn:
        result = await turn.finish()
    return JSONResponse(completion_of(result))


@router.post(
    "/v1/chat/completions",
    summary="Chat with server-side history: send only the new message with x-session-key.",
    openapi_extra=json_request_body(ChatCompletionRequest),
    responses=sse.documented(
        "A chat.completion object, or with stream=true an event stream of "
        "chat.completion.chunk objects ending with [DONE].",
        {
            400: "Invalid request (OpenAI error object).",
            413: "Request body too large.",
            503: "Model not loaded yet.",
        },
    ),
)
@generation
async def chat_completions(
    request: Request,
    engine: EngineDep,
    models: ModelsDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    x_session_key: str | None = Header(default=None),
) -> Response:
    """Continue the session the request names with its new messages; with no session and
    PARLOUR_SESSIONLESS=stateless, answer from the request's messages alone."""
    session_key, body = await read_session_request(request, x_session_key, settings)
    content, system = new_turn(body)
    messages = request_messages(body)
    if session_key is None:
        turn = engine.start(stateless_request(principal.owner_id, body, messages, _sampling(body)))
        return await _respond(turn, body)
    command = content.strip()
    if command in ("/new", "/help"):
        model = models.ready_model(body.model).spec.name
        if command == "/help":
            return _command_reply(body, model, HELP_TEXT)
        await engine.reset_session(owner_id=principal.owner_id, session_key=session_key)
        return _command_reply(body, model, "Started a new session.")
    turn = engine.start(
        TurnRequest(
            owner_id=principal.owner_id,
            target=Session(session_key),
            new=ChatMessage("user", content),
            sampling=_sampling(body),
            model=body.model,
            system=system,
            earlier=earlier_messages(messages),
            user_id=body.user,
            dialect="openai",
        )
    )
    return await _respond(turn, body)


async def _respond(turn: Turn, body: ChatCompletionRequest) -> Response:
    if body.stream:
        events = chunk_events(
            chunk=chunk, render_error=error_body, include_usage=body.include_usage
        )
        return await sse.stream(turn, events, closing=CLOSING)
    return await _complete(turn)


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
