"""The OpenAI-compatible dialect with server-side sessions keyed by `x-session-key`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..backends.base import ChatMessage, Role
from ..engine import Engine, Sampling, TurnRequest, TurnResult, TurnStream
from ..errors import InvalidRequest, ParlourError
from ..stateless import CompletionResult, CompletionStream
from . import sse
from .deps import EngineDep, ModelsDep, PrincipalDep, SettingsDep
from .errors import ErrorShape
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
    return "\n\n".join(users), ("\n\n".join(system) if system else None)


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

    return sse.response(events())


def _reply(result: TurnResult | CompletionResult) -> str:
    if isinstance(result, TurnResult):
        return result.assistant_message.content
    return result.text


async def _stream(
    turn: TurnStream | CompletionStream, body: ChatCompletionRequest, model: str
) -> AsyncIterator[str]:
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


async def _complete(turn: TurnStream | CompletionStream) -> Response:
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
            content=_reply(result),
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
    """Continue the session the request names with its new messages; with no session and
    PARLOUR_SESSIONLESS=stateless, answer from the request's messages alone."""
    session_key, body = await read_session_request(request, x_session_key, settings)
    content, system_prompt = new_turn(body)
    model = models.ready_model(body.model)
    if session_key is None:
        turn: TurnStream | CompletionStream = engine.complete(
            stateless_request(
                owner_id=principal.owner_id,
                body=body,
                messages=request_messages(body),
                sampling=_sampling(body),
                model=_known(engine, body.model),
            )
        )
        return await _respond(turn, body, model.spec.name)
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
    return await _respond(turn, body, model.spec.name)


def _known(engine: Engine, model: str | None) -> str | None:
    return model if model and engine.models.knows(model) else None


async def _respond(
    turn: TurnStream | CompletionStream, body: ChatCompletionRequest, model: str
) -> Response:
    if body.stream:
        try:
            await turn.first_output()
        except BaseException:
            turn.cancel()
            raise
        return sse.response(_stream(turn, body, turn.model or model))
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
            model=_known(engine, body.model),
            system_prompt=system_prompt,
            history=earlier_messages(request_messages(body)),
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
