"""The conversations REST API (samosaChaat): conversations and their messages, any dialect's."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import JSONResponse, Response

from ..engine import Sampling, TurnRequest, TurnStream
from ..errors import NotFound, ParlourError
from ..models import ModelRegistry
from ..store import queries
from ..store.tables import Conversation, Message, utcnow
from . import sse
from .deps import EngineDep, ModelsDep, PrincipalDep
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
    """A conversation as the API shows it."""

    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID
    user_id: uuid.UUID
    title: str
    model_tag: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Conversation) -> ConversationPublic:
        """The public view of a stored conversation."""
        return cls(
            id=row.id,
            user_id=row.owner_id,
            title=row.title,
            model_tag=row.model_tag,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class MessagePublic(BaseModel):
    """A message as the API shows it."""

    model_config = ConfigDict(extra="forbid")

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

    @classmethod
    def of(cls, row: Message) -> MessagePublic:
        """The public view of a stored message."""
        return cls(
            id=row.id,
            conversation_id=row.conversation_id,
            role=row.role,  # type: ignore[arg-type]
            content=row.content,
            token_count=row.token_count,
            model_tag=row.model_tag,
            inference_time_ms=row.inference_time_ms,
            created_at=row.created_at,
        )


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

router = APIRouter(
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
    engine: EngineDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> list[ConversationPublic]:
    """List the caller's conversations, from every dialect."""
    async with engine.db.read() as session, session.begin():
        rows = await queries.list_conversations(
            session, principal.owner_id, limit=limit, offset=offset
        )
        return [ConversationPublic.of(row) for row in rows]


@router.post(
    "",
    operation_id="createConversation",
    status_code=201,
    summary="Create a conversation.",
    responses={422: {"description": "Invalid body, or `model_tag` names no configured model."}},
)
async def create_conversation(
    body: ConversationCreate, engine: EngineDep, models: ModelsDep, principal: PrincipalDep
) -> ConversationPublic:
    """Create an empty conversation that the named model will answer."""
    _check_model(models, body.model_tag)
    async with engine.db.session() as session, session.begin():
        row = await queries.create_conversation(
            session, owner_id=principal.owner_id, title=body.title, model_tag=body.model_tag
        )
        return ConversationPublic.of(row)


@router.get(
    "/{conversationId}",
    operation_id="getConversation",
    summary="Fetch one conversation.",
    responses=NOT_FOUND,
)
async def get_conversation(
    conversation_id: ConversationId, engine: EngineDep, principal: PrincipalDep
) -> ConversationPublic:
    """One of the caller's conversations."""
    async with engine.db.read() as session, session.begin():
        return ConversationPublic.of(await _owned(session, principal.owner_id, conversation_id))


@router.patch(
    "/{conversationId}",
    operation_id="updateConversation",
    summary="Change a conversation's title or model.",
    responses=NOT_FOUND,
)
async def update_conversation(
    conversation_id: ConversationId,
    body: ConversationUpdate,
    engine: EngineDep,
    models: ModelsDep,
    principal: PrincipalDep,
) -> ConversationPublic:
    """Rename a conversation or switch the model that answers it."""
    _check_model(models, body.model_tag)
    async with engine.db.session() as session, session.begin():
        row = await _owned(session, principal.owner_id, conversation_id)
        if body.title is not None:
            row.title = body.title
        if body.model_tag is not None:
            row.model_tag = body.model_tag
        if body.title is not None or body.model_tag is not None:
            row.updated_at = utcnow()
        await session.flush()
        return ConversationPublic.of(row)


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
    async with (
        engine.locks.hold(conversation_id),
        engine.db.session() as session,
        session.begin(),
    ):
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
    engine: EngineDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> list[MessagePublic]:
    """The stored messages of one of the caller's conversations."""
    async with engine.db.read() as session, session.begin():
        row = await _owned(session, principal.owner_id, conversation_id)
        messages = await queries.list_messages(session, row.id, limit=limit, offset=offset)
        return [MessagePublic.of(m) for m in messages]


async def _events(turn: TurnStream) -> AsyncIterator[str]:
    try:
        try:
            async for delta in turn:
                yield sse.event({"token": delta})
        except ParlourError as exc:
            yield sse.event({"error": {"message": exc.message}})
        try:
            result = await turn.result()
            message: dict[str, Any] | None = MessagePublic.of(result.assistant_message).model_dump(
                mode="json"
            )
        except ParlourError:
            message = None
        yield sse.event({"done": True, "message": message})
    finally:
        # Reached when the client disconnects too: stop generating, keep the partial reply.
        turn.cancel()


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
    responses={
        200: {
            "description": STREAM_DESCRIPTION,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        400: {"model": ErrorDetail, "description": "The message does not fit the context."},
        **NOT_FOUND,
        503: {"model": ErrorDetail, "description": "The model is not loaded yet."},
    },
)
async def post_message(
    conversation_id: ConversationId,
    body: MessageCreate,
    engine: EngineDep,
    principal: PrincipalDep,
) -> Response:
    """Add a user message and generate the reply with the conversation's model."""
    turn = engine.turn(
        TurnRequest(
            owner_id=principal.owner_id,
            conversation_id=conversation_id,
            content=body.message.content,
            sampling=Sampling(max_tokens=body.max_tokens, temperature=body.temperature),
            dialect="conversations",
        )
    )
    try:
        await turn.started()
        if body.stream:
            # A failure before any text still gets a real HTTP status.
            await turn.first_output()
    except BaseException:
        turn.cancel()
        raise
    if body.stream:
        return sse.response(_events(turn), closing=_closing)
    try:
        async for _ in turn:
            pass
        result = await turn.result()
    finally:
        turn.cancel()
    return JSONResponse(MessagePublic.of(result.assistant_message).model_dump(mode="json"))
