"""The Bot API: stateless chat with a configured bot (`POST /chat`, `/v1/chat`), `GET /v1/bots`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import bots
from ..backends.base import ChatMessage
from ..engine import Sampling
from ..errors import InvalidRequest, ModelNotFound, ParlourError
from ..models import ModelRegistry
from ..stateless import CompletionRequest, CompletionStream
from ..store.tables import Bot
from . import sse
from .body import off_loop, read_body
from .bots_protocol import BodyInvalid, BodyUnreadable, BotChatRequest, parse
from .deps import EngineDep, ModelsDep, PrincipalDep, SettingsDep
from .errors import ErrorShape, detail_body, validation_response

router = APIRouter(tags=["bot api"])

BOT_API_PATHS = ("/chat", "/v1/chat", "/v1/bots")


def bot_api_shape() -> ErrorShape:
    """Errors on the Bot API's paths are FastAPI's `{"detail": message}`."""
    return ErrorShape(matches=lambda path: path.rstrip("/") in BOT_API_PATHS, render=detail_body)


def model_name(models: ModelRegistry, name: str | None) -> str:
    """The model that serves requests naming `name`."""
    try:
        return models.get(name).spec.name
    except ModelNotFound:
        return name or models.default.spec.name


def instructions(body: BotChatRequest) -> list[str]:
    """System prompt lines for the request's `language` and `max_words`."""
    lines: list[str] = []
    if body.language and body.language.strip():
        lines.append(f"Answer in {body.language.strip()}.")
    if body.max_words is not None:
        lines.append(f"Keep the answer under {body.max_words} words.")
    return lines


def completion_request(owner_id: Any, bot: Bot, body: BotChatRequest) -> CompletionRequest:
    """The engine request: the bot's system prompt first, then the request's, then the
    instructions; the bot's model settings and knowledge base."""
    system: list[str] = []
    history: list[ChatMessage] = []
    for message in body.messages or ():
        if message.role == "system":
            system.append(message.content)
        else:
            history.append(ChatMessage(message.role, message.content))  # type: ignore[arg-type]
    if body.prompt is not None:
        history.append(ChatMessage("user", body.prompt))
    if not history:
        raise InvalidRequest(
            "There is nothing to answer: send a prompt, or messages with at least one user message."
        )
    return CompletionRequest(
        owner_id=owner_id,
        messages=tuple(history),
        system=tuple(bots.system_parts(bot, [*system, *instructions(body)])),
        sampling=Sampling().with_bot(bot),
        model=bot.model,
        retrieval=bot.enable_l0_retrieval,
        knowledge_base_id=bot.kb_id,
        bot_id=bot.uid,
        user_id=body.user_id,
        dialect="bot",
    )


async def _events(stream: CompletionStream) -> AsyncIterator[str]:
    try:
        yield sse.event({"content": ""})
        try:
            async for delta in stream:
                yield sse.event({"content": delta})
        except ParlourError as exc:
            yield sse.event(detail_body(exc))
        yield sse.DONE
    finally:
        # Also reached when the client disconnects: stop generating.
        stream.cancel()


CHAT_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["stream"],
                    "properties": {
                        "bot_uid": {"type": "string"},
                        "bot_slug": {"type": "string"},
                        "prompt": {"type": "string"},
                        "messages": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["role", "content"],
                                "properties": {
                                    "role": {"enum": ["system", "user", "assistant"]},
                                    "content": {"type": "string"},
                                },
                            },
                        },
                        "stream": {"type": "boolean"},
                        "user_id": {"type": "string"},
                        "language": {"type": "string"},
                        "max_words": {"type": "integer", "minimum": 1},
                    },
                }
            }
        },
    }
}


async def chat(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> Response:
    """Answer as a bot; the client sends the whole conversation."""
    raw = await read_body(request, settings.max_body_bytes)
    try:
        body = await off_loop(parse, raw)
    except BodyInvalid as exc:
        return validation_response(exc.errors)
    except BodyUnreadable as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    async with engine.db.read() as session, session.begin():
        bot = await bots.resolve(session, uid=body.bot_uid, slug=body.bot_slug)
    stream = engine.complete(completion_request(principal.owner_id, bot, body))
    if body.stream:
        try:
            await stream.first_output()
        except BaseException:
            stream.cancel()
            raise
        return sse.response(
            _events(stream), closing=lambda e: [sse.event(detail_body(e)), sse.DONE]
        )
    try:
        async for _ in stream:
            pass
        result = await stream.result()
    finally:
        stream.cancel()
    return JSONResponse({"content": result.text})


for path in ("/chat", "/v1/chat"):
    router.add_api_route(
        path,
        chat,
        methods=["POST"],
        summary="Chat with a bot (stateless: send the whole conversation).",
        openapi_extra=CHAT_SCHEMA,
        responses={
            200: {
                "description": '`{"content": "…"}`, or with stream=true an event stream of '
                '`{"content": "…"}` events (the first empty) ending with [DONE].',
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            404: {"description": '`{"detail": "Bot not found"}`'},
            422: {"description": "pydantic v1-style validation errors, all at once."},
        },
    )


@router.get("/v1/bots", summary="The bots this server offers.")
async def list_bots(engine: EngineDep, models: ModelsDep, principal: PrincipalDep) -> Any:
    """Every bot's uid, slug, name, description, model and welcome message."""
    async with engine.db.read() as session, session.begin():
        found = await bots.list_bots(session)
    return [bots.public(v.bot, model_name(models, v.bot.model)) for v in found]
