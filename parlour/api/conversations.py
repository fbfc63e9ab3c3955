"""The conversations REST API (samosaChaat): conversations and their messages, any dialect's."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from fastapi.exceptions import RequestValidationError
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import JSONResponse, Response

from ..backends.base import ChatMessage
from ..errors import NotFound, ParlourError
from ..models import ModelRegistry
from ..store import queries
from ..store.tables import Conversation, utcnow
from ..turns.request import Sampling, Stored, TurnRequest, TurnResult
from ..turns.stream import Turn
from . import sse
from .deps import EngineDep, ModelsDep, PrincipalDep, ReadSession, WriteSession
from .guard import GuardedRouter, generation
from .wire import MAX_INT, Int, Number, Text

MAX_TITLE = 255


class ConversationCreate(BaseModel):
    """Body of POST /conversations."""

    model_config = ConfigDict(extra="ignore")

    title: Text = Field(max_length=MAX_TITLE)
    model_tag: Text = Field(
        min_length=1, max_length=255, description="A configured model or alias (GET /v1/models)."
    )


class ConversationUpdate(BaseModel):
    """Body of PATCH /conversations/{conversationId}; absent or null fields stay as they are."""

    model_config = ConfigDict(extra="ignore")

    title: Text | None = Field(default=None, max_length=MAX_TITLE)
    model_tag: Text | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="A configured model or alias (GET /v1/models).",
    )


class ConversationPublic(BaseModel):
    """A conversation as the API shows it (validated from a stored row)."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)

    id: uuid.UUID
    user_id: uuid.UUID = Field(validation_alias=AliasChoices("user_id", "owner_id"))
    title: str
    model_tag: str
    created_at: datetime
    updated_at: datetime


class MessagePublic(BaseModel):
    """A message as the API shows it (validated from a stored row)."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)

    id: uuid.UUID
    conversation_id: uuid.UUID
    role: Literal["system", "user", "assistant"]
    content: str
    token_count: int = Field(description="Tokens of the model's tokenizer.")
    model_tag: str | None = Field(description="The model that wrote it; null for user messages.")
    inference_time_ms: int | None = Field(
        description="Milliseconds spent generating it; null for user messages."
    )
    created_at: datetime


class NewMessage(BaseModel):
    """The user message to send; fields the server generates (id, token_count, …) are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["user"] = "user"
    content: Text = Field(min_length=1)


class MessageCreate(BaseModel):
    """Body of POST /conversations/{conversationId}/messages."""

    model_config = ConfigDict(extra="ignore")

    message: NewMessage
    stream: bool = Field(
        default=True, description="Stream the reply as Server-Sent Events (default)."
    )
    temperature: Number | None = Field(default=None, ge=0, le=2)
    max_tokens: Int | None = Field(default=None, ge=1, description="Longest reply, in tokens.")


class ErrorDetail(BaseModel):
    """FastAPI's error shape."""

    detail: str


ConversationId = Annotated[
    uuid.UUID, Path(alias="conversationId", description="The conversation's uuid.")
]

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "No such conversation, or not yours."}
}

STREAM_DESCRIPTION = (
    'With stream=true (default): `text/event-stream` of `data: {"token": "…"}` events, '
    'then `data: {"done": true, "message": <assistant message>}`; a failure after the '
    'stream began is sent as `data: {"error": {"message": "…"}}` before the done event '
    "(whose message is then the partial reply, or null). With stream=false: the assistant "
    "message as JSON."
)

router = GuardedRouter(
    prefix="/conversations",
    tags=["conversations"],
    responses={401: {"model": ErrorDetail, "description": "Missing or invalid bearer token."}},
)


def _check_model(models: ModelRegistry, name: str | None) -> None:
    if name is not None and not models.knows(name):
        known = ", ".join(sorted(n for n, _created, _owner in models.listing()))
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", "model_tag"),
                    "msg": f"Unknown model {name!r}: use one of {known} (GET /v1/models).",
                    "input": name,
                }
            ]
        )


async def _owned(
    session: AsyncSession, owner_id: uuid.UUID, conversation_id: uuid.UUID
) -> Conversation:
    conversation = await queries.conversation_for_owner(session, owner_id, conversation_id)
    if conversation is None:
        raise NotFound("Conversation not found; GET /conversations lists yours.")
    return conversation


@router.get(
    "",
    operation_id="listConversations",
    summary="The caller's conversations, most recently updated first.",
)
async def list_conversations(
    session: ReadSession,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> list[ConversationPublic]:
    """List the caller's conversations, from every dialect."""
    rows = await queries.list_conversations(session, principal.owner_id, limit=limit, offset=offset)
    return [ConversationPublic.model_validate(row) for row in rows]


@router.post(
    "",
    operation_id="createConversation",
    status_code=201,
    summary="Create a conversation.",
    responses={422: {"description": "Invalid body, or `model_tag` names no configured model."}},
)
async def create_conversation(
    body: ConversationCreate, session: WriteSession, models: ModelsDep, principal: PrincipalDep
) -> ConversationPublic:
    """Create an empty conversation that the named model will answer."""
    _check_model(models, body.model_tag)
    row = await queries.create_conversation(
        session, owner_id=principal.owner_id, title=body.title, model_tag=body.model_tag
    )
    return ConversationPublic.model_validate(row)


@router.get(
    "/{conversationId}",
    operation_id="getConversation",
    summary="Fetch one conversation.",
    responses=NOT_FOUND,
)
async def get_conversation(
    conversation_id: ConversationId, session: ReadSession, principal: PrincipalDep
) -> ConversationPublic:
    """One of the caller's conversations."""
    return ConversationPublic.model_validate(
        await _owned(session, principal.owner_id, conversation_id)
    )


@router.patch(
    "/{conversationId}",
    operation_id="updateConversation",
    summary="Change a conversation's title or model.",
    responses=NOT_FOUND,
)
async def update_conversation(
    conversation_id: ConversationId,
    body: ConversationUpdate,
    session: WriteSession,
    models: ModelsDep,
    principal: PrincipalDep,
) -> ConversationPublic:
    """Rename a conversation or switch the model that answers it."""
    _check_model(models, body.model_tag)
    row = await _owned(session, principal.owner_id, conversation_id)
    if body.title is not None:
        row.title = body.title
    if body.model_tag is not None:
        row.model_tag = body.model_tag
    if body.title is not None or body.model_tag is not None:
        row.updated_at = utcnow()
    await session.flush()
    return ConversationPublic.model_validate(row)


@router.delete(
    "/{conversationId}",
    operation_id="deleteConversation",
    status_code=204,
    summary="Delete a conversation and its messages.",
    responses=NOT_FOUND,
)
async def delete_conversation(
    conversation_id: ConversationId, engine: EngineDep, principal: PrincipalDep
) -> Response:
    """Delete a conversation; a reply being written to it finishes first."""
    async with engine.editing(conversation_id) as session:
        row = await _owned(session, principal.owner_id, conversation_id)
        await queries.delete_conversation(session, row)
    return Response(status_code=204)


@router.get(
    "/{conversationId}/messages",
    operation_id="listMessages",
    summary="A conversation's messages, oldest first.",
    responses=NOT_FOUND,
)
async def list_messages(
    conversation_id: ConversationId,
    session: ReadSession,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> list[MessagePublic]:
    """The stored messages of one of the caller's conversations."""
    row = await _owned(session, principal.owner_id, conversation_id)
    messages = await queries.list_messages(session, row.id, limit=limit, offset=offset)
    return [MessagePublic.model_validate(m) for m in messages]


async def _events(turn: Turn) -> AsyncIterator[str]:
    try:
        async for delta in turn:
            yield sse.event({"token": delta})
    except ParlourError as exc:
        yield sse.event({"error": {"message": exc.message}})
    try:
        result = await turn.result()
        message: dict[str, Any] | None = _public(result)
    except ParlourError:
        message = None
    yield sse.event({"done": True, "message": message})


def _public(result: TurnResult) -> dict[str, Any]:
    assert result.assistant_message is not None  # a turn on a stored conversation
    return MessagePublic.model_validate(result.assistant_message).model_dump(mode="json")


def _closing(error: ParlourError) -> list[str]:
    return [
        sse.event({"error": {"message": error.message}}),
        sse.event({"done": True, "message": None}),
    ]


@router.post(
    "/{conversationId}/messages",
    operation_id="postMessage",
    summary="Send a user message; the reply streams as Server-Sent Events or comes as JSON.",
    response_model=MessagePublic,
    responses=sse.documented(
        STREAM_DESCRIPTION,
        {
            400: {"model": ErrorDetail, "description": "The message does not fit the context."},
            **NOT_FOUND,
            503: {"model": ErrorDetail, "description": "The model is not loaded yet."},
        },
    ),
)
@generation
async def post_message(
    conversation_id: ConversationId,
    body: MessageCreate,
    engine: EngineDep,
    principal: PrincipalDep,
) -> Response:
    """Add a user message and generate the reply with the conversation's model."""
    turn = engine.start(
        TurnRequest(
            owner_id=principal.owner_id,
            target=Stored(conversation_id),
            new=ChatMessage("user", body.message.content),
            sampling=Sampling(max_tokens=body.max_tokens, temperature=body.temperature),
            dialect="conversations",
        )
    )
    if body.stream:
        return await sse.stream(turn, _events, closing=_closing)
    async with turn:
        result = await turn.finish()
    return JSONResponse(_public(result))
