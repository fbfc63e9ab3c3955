"""The Bot API: stateless chat with a configured bot (`POST /chat`, `/v1/chat`), `GET /v1/bots`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..backends.base import ChatMessage
from ..errors import BodyInvalid, InvalidRequest, ModelNotFound, ParlourError
from ..models import ModelRegistry
from ..store import queries
from ..turns.request import BotRef, Messages, TurnRequest
from ..turns.stream import Turn
from . import sse
from .body import off_loop, read_body
from .bots_protocol import BotChatRequest, parse, public
from .deps import EngineDep, ModelsDep, PrincipalDep, ReadSession, SettingsDep
from .errors import DialectRouter, encodable_errors
from .guard import generation


def error_body(error: ParlourError) -> Any:
    """FastAPI's `{"detail": …}`: a message, or pydantic v1's list of validation errors."""
    if isinstance(error, BodyInvalid):
        return {"detail": encodable_errors(error.errors)}
    return {"detail": error.message}


router = DialectRouter(tags=["bot api"], render_error=error_body)


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


def turn_request(owner_id: Any, body: BotChatRequest) -> TurnRequest:
    """The engine request: the whole conversation, not stored; the bot's system prompt comes
    first, then the request's, then the instructions (the bot is applied in the core)."""
    system: list[str] = []
    history: list[ChatMessage] = []
    for message in body.messages or ():
        if message.role == "system":
            system.append(message.content)
        else:
            history.append(message)
    if body.prompt is not None:
        history.append(ChatMessage("user", body.prompt))
    if not history:
        raise InvalidRequest(
            "There is nothing to answer: send a prompt, or messages with at least one user message."
        )
    *earlier, new = history
    bot = BotRef(body.bot_uid, by="uid") if body.bot_uid is not None else None
    return TurnRequest(
        owner_id=owner_id,
        target=Messages(tuple(earlier)),
        new=new,
        bot=bot or BotRef(body.bot_slug or "", by="slug"),
        system=(*system, *instructions(body)),
        shrink_reply=True,
        user_id=body.user_id,
        dialect="bot",
    )


async def _events(turn: Turn) -> AsyncIterator[str]:
    yield sse.event({"content": ""})
    try:
        async for delta in turn:
            yield sse.event({"content": delta})
    except ParlourError as exc:
        yield sse.event(error_body(exc))
    yield sse.DONE


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


@generation
async def chat(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> Response:
    """Answer as a bot; the client sends the whole conversation."""
    body = await off_loop(parse, await read_body(request, settings.max_body_bytes))
    turn = engine.start(turn_request(principal.owner_id, body))
    if body.stream:
        return await sse.stream(turn, _events, closing=sse.ending(error_body))
    async with turn:
        result = await turn.finish()
    return JSONResponse({"content": result.text})


for path in ("/chat", "/v1/chat"):
    router.add_api_route(
        path,
        chat,
        methods=["POST"],
        summary="Chat with a bot (stateless: send the whole conversation).",
        openapi_extra=CHAT_SCHEMA,
        responses=sse.documented(
            '`{"content": "…"}`, or with stream=true an event stream of '
            '`{"content": "…"}` events (the first empty) ending with [DONE].',
            {
                404: '`{"detail": "Bot not found"}`',
                422: "pydantic v1-style validation errors, all at once.",
            },
        ),
    )


@router.get("/v1/bots", summary="The bots this server offers.")
async def list_bots(session: ReadSession, models: ModelsDep, principal: PrincipalDep) -> Any:
    """Every bot's uid, slug, name, description, model and welcome message."""
    found = await queries.list_bots(session)
    return [public(bot, model_name(models, bot.model)) for bot in found]


@router.get("/health-check", summary="The aBLT SDK's readiness check: status ok once ready.")
async def health_check(models: ModelsDep, principal: PrincipalDep) -> JSONResponse:
    """`{"status": "ok"}` once the default model can answer (checks the token too)."""
    if models.ready:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "loading"}, status_code=503)
