"""Second Me's local chat API: stateless `POST /api/kernel2/chat`, OpenAI-shaped chunks."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Literal

from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..backends.base import ChatMessage
from ..errors import BotNotFound, InvalidRequest, ParlourError
from ..turns.request import BotRef, Messages, Sampling, TurnRequest
from . import sse
from .body import read_json
from .chat_stream import chunk_events, completion_of
from .deps import EngineDep, PrincipalDep, SettingsDep
from .errors import DialectRouter
from .guard import generation
from .openai_protocol import ContentPart, Wire
from .openai_protocol import chunk as openai_chunk
from .schema import json_request_body
from .wire import Int, Number, Text

PREFIX = "/api/kernel2"
DEFAULT_TEMPERATURE = 0.1
DEFAULT_MAX_TOKENS = 2000


def error_body(error: ParlourError) -> dict[str, Any]:
    """Second Me's error object; bots are roles here."""
    message = error.message
    if isinstance(error, BotNotFound):
        message = f"Role {error.ref} not found; GET /v1/bots lists the roles' uids."
    return {"success": False, "message": message, "code": error.status}


#: How a Second Me stream ends when the server shuts down.
CLOSING = sse.ending(error_body)

router = DialectRouter(tags=["second me"], render_error=error_body)


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


def turn_request(owner_id: uuid.UUID, body: Kernel2Request) -> TurnRequest:
    """The engine request: the whole history, not stored. A role's system prompt replaces
    the request's, and its L0 flag, model and settings win (decided in the core)."""
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
    *earlier, new = history
    return TurnRequest(
        owner_id=owner_id,
        target=Messages(tuple(earlier)),
        new=new,
        sampling=Sampling(
            max_tokens=body.max_tokens or DEFAULT_MAX_TOKENS, temperature=temperature
        ),
        model=body.model,
        bot=BotRef(metadata.role_id) if metadata.role_id else None,
        system=tuple(system),
        bot_replaces_system=True,
        retrieval=bool(metadata.enable_l0_retrieval),
        shrink_reply=True,
        dialect="kernel2",
    )


def fingerprint(model: str) -> str:
    """A stable `system_fingerprint` for this server version and model."""
    return "fp_" + hashlib.sha256(f"parlour {__version__} {model}".encode()).hexdigest()[:10]


def chunk(*, model: str, **fields: Any) -> dict[str, Any]:
    """A `chat.completion.chunk` as the seed documents it: OpenAI's, with a fingerprint."""
    return {**openai_chunk(model=model, **fields), "system_fingerprint": fingerprint(model)}


@router.post(
    f"{PREFIX}/chat",
    summary="Second Me chat: stateless, OpenAI-compatible, streaming by default.",
    openapi_extra=json_request_body(Kernel2Request),
    responses=sse.documented(
        "An event stream of chat.completion.chunk objects ending with "
        "[DONE] (`: heartbeat` comments while waiting), or with stream=false a "
        "chat.completion object.",
        {
            400: '`{"success": false, "message": "…", "code": 400}`',
            404: "Unknown role_id.",
            503: {"description": "The model is not loaded yet."},
        },
    ),
)
@generation
async def chat(
    request: Request, engine: EngineDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """Answer the last message of the history the client sends."""
    body = parse_request(await read_json(request, settings.max_body_bytes))
    turn = engine.start(turn_request(principal.owner_id, body))
    if body.stream is not False:
        events = chunk_events(
            chunk=chunk, render_error=error_body, heartbeat=settings.heartbeat_seconds
        )
        return await sse.stream(turn, events, wait_for_output=False, closing=CLOSING)
    async with turn:
        result = await turn.finish()
    return JSONResponse({**completion_of(result), "system_fingerprint": fingerprint(result.model)})
