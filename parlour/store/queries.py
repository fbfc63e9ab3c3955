"""The queries every dialect shares, as plain functions over an AsyncSession."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .tables import Conversation, Message, Owner, utcnow

LOCAL_OWNER = "local"


async def ensure_owner(session: AsyncSession, name: str) -> Owner:
    """The owner row with this name, created on first use."""
    owner = await session.scalar(select(Owner).where(Owner.name == name))
    if owner is not None:
        return owner
    try:
        async with session.begin_nested():
            owner = Owner(name=name)
            session.add(owner)
    except IntegrityError:
        owner = await session.scalar(select(Owner).where(Owner.name == name))
        if owner is None:  # pragma: no cover - the row that conflicted must exist
            raise
    return owner


async def conversation_for_owner(
    session: AsyncSession, owner_id: uuid.UUID, conversation_id: uuid.UUID
) -> Conversation | None:
    """A conversation if it exists and belongs to this owner."""
    return await session.scalar(
        select(Conversation).where(
            Conversation.id == conversation_id, Conversation.owner_id == owner_id
        )
    )


async def conversation_for_session(
    session: AsyncSession, owner_id: uuid.UUID, session_key: str
) -> Conversation | None:
    """The conversation currently bound to an OpenAI-dialect session key."""
    return await session.scalar(
        select(Conversation).where(
            Conversation.owner_id == owner_id, Conversation.session_key == session_key
        )
    )


async def create_conversation(
    session: AsyncSession,
    *,
    owner_id: uuid.UUID,
    title: str,
    model_tag: str,
    session_key: str | None = None,
    bot_id: uuid.UUID | None = None,
) -> Conversation:
    """Insert a new conversation and return it."""
    now = utcnow()
    conversation = Conversation(
        owner_id=owner_id,
        title=title,
        model_tag=model_tag,
        session_key=session_key,
        bot_id=bot_id,
        created_at=now,
        updated_at=now,
    )
    session.add(conversation)
    await session.flush()
    return conversation


async def list_messages(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    *,
    limit: int | None = None,
    offset: int = 0,
) -> Sequence[Message]:
    """A conversation's messages, oldest first."""
    query = (
        select(Message)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.position)
        .offset(offset)
    )
    if limit is not None:
        query = query.limit(limit)
    return (await session.scalars(query)).all()


async def append_message(
    session: AsyncSession,
    conversation: Conversation,
    *,
    role: str,
    content: str,
    token_count: int,
    model_tag: str | None = None,
    inference_time_ms: int | None = None,
    finish_reason: str | None = None,
) -> Message:
    """Add a message at the end of a conversation and touch its `updated_at`."""
    last = await session.scalar(
        select(func.max(Message.position)).where(Message.conversation_id == conversation.id)
    )
    now = utcnow()
    message = Message(
        conversation_id=conversation.id,
        position=(last if last is not None else -1) + 1,
        role=role,
        content=content,
        token_count=token_count,
        model_tag=model_tag,
        inference_time_ms=inference_time_ms,
        finish_reason=finish_reason,
        created_at=now,
    )
    session.add(message)
    await session.execute(
        update(Conversation).where(Conversation.id == conversation.id).values(updated_at=now)
    )
    conversation.updated_at = now
    await session.flush()
    return message


async def list_conversations(
    session: AsyncSession, owner_id: uuid.UUID, *, limit: int, offset: int = 0
) -> Sequence[Conversation]:
    """An owner's conversations, most recently updated first."""
    query = (
        select(Conversation)
        .where(Conversation.owner_id == owner_id)
        .order_by(Conversation.updated_at.desc(), Conversation.created_at.desc(), Conversation.id)
        .limit(limit)
        .offset(offset)
    )
    return (await session.scalars(query)).all()


async def delete_conversation(session: AsyncSession, conversation: Conversation) -> None:
    """Remove a conversation with all its messages."""
    await session.execute(delete(Message).where(Message.conversation_id == conversation.id))
    await session.delete(conversation)
    await session.flush()
