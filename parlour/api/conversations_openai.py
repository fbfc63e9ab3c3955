"""OpenAI's Conversations API over parlour's conversations: items are their messages."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from ..errors import InvalidRequest, NotFound
from ..store import queries
from ..store import responses as store
from ..store.tables import Conversation, Message
from ..turns.engine import Engine
from ..turns.request import DEFAULT_TITLE
from .deps import EngineDep, PrincipalDep
from .openai_protocol import json_body
from .responses_protocol import (
    ConversationCreate,
    ConversationUpdate,
    ItemsCreate,
    conversation_object,
    dialect_router,
    item_list,
    item_text,
    message_id,
    message_item,
    normalise_items,
)

router = dialect_router()

ConversationCreateBody = Annotated[ConversationCreate, json_body(ConversationCreate)]
ConversationUpdateBody = Annotated[ConversationUpdate, json_body(ConversationUpdate)]
ItemsCreateBody = Annotated[ItemsCreate, json_body(ItemsCreate)]


def conversation_uuid(value: str) -> uuid.UUID:
    """The conversation uuid behind `conv_<hex>` (or a bare uuid); 404 for anything else."""
    try:
        return uuid.UUID(value.removeprefix("conv_"))
    except ValueError:
        raise NotFound(f"Conversation with id '{value}' not found.", param="conversation") from None


async def owned_conversation(
    session: AsyncSession, owner_id: uuid.UUID, conversation_id: uuid.UUID
) -> Conversation:
    """The owner's conversation, else 404 (also for another owner's)."""
    found = await queries.conversation_for_owner(session, owner_id, conversation_id)
    if found is None:
        raise NotFound(
            f"Conversation with id 'conv_{conversation_id.hex}' not found.", param="conversation"
        )
    return found


def query_int(value: str | None, name: str, default: int, *, low: int, high: int) -> int:
    """An integer query parameter within bounds, else a 400 naming it."""
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an integer.", param=name) from None
    if not low <= number <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}.", param=name)
    return number


def list_page(
    items: Sequence[dict[str, Any]], query: Mapping[str, str], *, default_order: str
) -> dict[str, Any]:
    """One page of items (oldest first in `items`) by `order`, `after` and `limit`."""
    order = query.get("order") or default_order
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order")
    limit = query_int(query.get("limit"), "limit", 20, low=1, high=100)
    ordered = list(items) if order == "asc" else list(reversed(items))
    start = 0
    after = query.get("after")
    if after:
        ids = [i["id"] for i in ordered]
        if after not in ids:
            raise InvalidRequest(f"No item with id '{after}' in this list.", param="after")
        start = ids.index(after) + 1
    page = ordered[start : start + limit]
    return item_list(page, has_more=len(ordered) > start + limit)


async def append_items(
    engine: Engine, session: AsyncSession, conversation: Conversation, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Add message items at the end of a conversation (the caller holds its turn lock)."""
    backend = engine.models.get(conversation.model_tag).backend
    added: list[dict[str, Any]] = []
    for item in items:
        text = item_text(item)
        role = "system" if item["role"] in ("system", "developer") else item["role"]
        message = await queries.append_message(
            session, conversation, role=role, content=text, token_count=backend.count_tokens(text)
        )
        added.append(message_item(message))
    return added


async def _object(session: AsyncSession, conversation: Conversation) -> dict[str, Any]:
    metadata = await store.conversation_metadata(session, conversation.id)
    return conversation_object(conversation.id, conversation.created_at.timestamp(), metadata)


@router.post("/v1/conversations", summary="Create a conversation, optionally with items.")
async def create_conversation(
    body: ConversationCreateBody, engine: EngineDep, principal: PrincipalDep
) -> dict[str, Any]:
    """An ordinary parlour conversation of the owner, reachable here as `conv_<hex>`."""
    items = normalise_items(body.items, "items")
    async with engine.db.session() as session, session.begin():
        conversation = await queries.create_conversation(
            session,
            owner_id=principal.owner_id,
            title=DEFAULT_TITLE,
            model_tag=engine.models.get(None).spec.name,
        )
        await append_items(engine, session, conversation, items)
        if body.metadata:
            await store.set_conversation_metadata(session, conversation.id, body.metadata)
        return await _object(session, conversation)


@router.get("/v1/conversations/{conversation_id}", summary="A conversation.")
async def get_conversation(
    conversation_id: str, engine: EngineDep, principal: PrincipalDep
) -> dict[str, Any]:
    """The conversation object with its metadata."""
    cid = conversation_uuid(conversation_id)
    async with engine.db.read() as session, session.begin():
        return await _object(session, await owned_conversation(session, principal.owner_id, cid))


@router.post("/v1/conversations/{conversation_id}", summary="Update a conversation's metadata.")
async def update_conversation(
    body: ConversationUpdateBody, conversation_id: str, engine: EngineDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Replace the conversation's metadata."""
    cid = conversation_uuid(conversation_id)
    async with engine.db.session() as session, session.begin():
        conversation = await owned_conversation(session, principal.owner_id, cid)
        await store.set_conversation_metadata(session, cid, body.metadata)
        return await _object(session, conversation)


@router.delete("/v1/conversations/{conversation_id}", summary="Delete a conversation.")
async def delete_conversation(
    conversation_id: str, engine: EngineDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Remove the conversation and its items."""
    cid = conversation_uuid(conversation_id)
    async with engine.editing(cid) as session:
        conversation = await owned_conversation(session, principal.owner_id, cid)
        await queries.delete_conversation(session, conversation)
    return {"id": f"conv_{cid.hex}", "object": "conversation.deleted", "deleted": True}


@router.post("/v1/conversations/{conversation_id}/items", summary="Add items to a conversation.")
async def create_items(
    body: ItemsCreateBody, conversation_id: str, engine: EngineDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Append up to 20 message items."""
    items = normalise_items(body.items, "items")
    cid = conversation_uuid(conversation_id)
    async with engine.editing(cid) as session:
        conversation = await owned_conversation(session, principal.owner_id, cid)
        added = await append_items(engine, session, conversation, items)
    return item_list(added, has_more=False)


@router.get("/v1/conversations/{conversation_id}/items", summary="A conversation's items.")
async def list_items(
    conversation_id: str, request: Request, engine: EngineDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Items by `order` (default newest first), `after` and `limit` (1-100, default 20)."""
    cid = conversation_uuid(conversation_id)
    async with engine.db.read() as session, session.begin():
        await owned_conversation(session, principal.owner_id, cid)
        messages = await queries.list_messages(session, cid)
    return list_page(
        [message_item(m) for m in messages], request.query_params, default_order="desc"
    )


async def _item(session: AsyncSession, cid: uuid.UUID, item_id: str) -> Message:
    mid = message_id(item_id)
    message = await session.get(Message, mid) if mid is not None else None
    if message is None or message.conversation_id != cid:
        raise NotFound(f"Item with id '{item_id}' not found.", param="item_id")
    return message


@router.get("/v1/conversations/{conversation_id}/items/{item_id}", summary="One item.")
async def get_item(
    conversation_id: str, item_id: str, engine: EngineDep, principal: PrincipalDep
) -> dict[str, Any]:
    """One message of the conversation as an item."""
    cid = conversation_uuid(conversation_id)
    async with engine.db.read() as session, session.begin():
        await owned_conversation(session, principal.owner_id, cid)
        return message_item(await _item(session, cid, item_id))


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}", summary="Delete an item.")
async def delete_item(
    conversation_id: str, item_id: str, engine: EngineDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Remove one message; answers the conversation."""
    cid = conversation_uuid(conversation_id)
    async with engine.editing(cid) as session:
        conversation = await owned_conversation(session, principal.owner_id, cid)
        await session.delete(await _item(session, cid, item_id))
        await session.flush()
        # Move the newest message one place on: every process's cached history of this
        # conversation is checked against the last position, so this retires them all.
        last = await session.scalar(
            select(func.max(Message.position)).where(Message.conversation_id == cid)
        )
        if last is not None:
            await session.execute(
                update(Message)
                .where(Message.conversation_id == cid, Message.position == last)
                .values(position=last + 1)
            )
        result = await _object(session, conversation)
    return result
