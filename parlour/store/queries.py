"""The queries every dialect shares: plain functions over an AsyncSession, or over a
Database.begin() connection for the statements every turn runs."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .db import TransactionConnection
from .direct import Direct, Prepared
from .tables import Bot, Conversation, Message, Owner, utcnow

if TYPE_CHECKING:
    from ..backends.base import ChatMessage

LOCAL_OWNER = "local"
#: Key of a pooled connection's `info` holding a callable told each run() statement's
#: seconds (parlour.ops.metrics sets it; on a SQLite file, DirectPool.timed does the same).
STATEMENT_TIMER = "parlour_statement_timer"

# The hot path of a turn uses Core statements on a connection, built once: an ORM
# session costs several times more per statement than the statement itself.
CONVERSATIONS = cast(Table, Conversation.__table__)
MESSAGES = cast(Table, Message.__table__)
_conv, _msg = CONVERSATIONS.c, MESSAGES.c
_LAST_POSITION = (
    select(func.max(_msg.position))
    .where(_msg.conversation_id == _conv.id)
    .scalar_subquery()
    .label("last_position")
)
_CONVERSATION_KEYS = [c.key for c in CONVERSATIONS.c]
_CONVERSATION_FOR_TURN = Prepared(
    select(CONVERSATIONS, _LAST_POSITION).where(
        _conv.id == bindparam("id"), _conv.owner_id == bindparam("owner")
    )
)
_CONVERSATION_FOR_SESSION = Prepared(
    select(CONVERSATIONS).where(
        _conv.owner_id == bindparam("owner"), _conv.session_key == bindparam("key")
    )
)
_RECENT_HISTORY = Prepared(
    select(_msg.role, _msg.content, _msg.token_count)
    .where(
        _msg.conversation_id == bindparam("id"),
        or_(_msg.role == "user", _msg.role == "assistant"),
    )
    .order_by(_msg.position.desc())
    .limit(bindparam("limit"))
)
_INSERT_MESSAGE = Prepared(insert(MESSAGES), columns=[c.key for c in MESSAGES.c])


async def run(
    conn: TransactionConnection, prepared: Prepared, parameters: dict[str, Any]
) -> Sequence[Sequence[Any]]:
    """Run a prepared statement in a Database.begin() transaction; its rows as tuples."""
    if isinstance(conn, Direct):
        return conn.run(prepared, parameters)
    timed = conn.info.get(STATEMENT_TIMER)
    began = time.perf_counter()
    result = await conn.execute(prepared.statement, parameters)
    rows = result.all() if result.returns_rows else []
    if timed is not None:
        timed(time.perf_counter() - began)
    return rows


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
    session: AsyncSession, conversation: Conversation, *, role: str, content: str, token_count: int
) -> Message:
    """Add a message at the end of a conversation (the caller holds its turn lock) and touch
    its `updated_at`, in the session's transaction."""
    last = await session.scalar(
        select(func.max(Message.position)).where(Message.conversation_id == conversation.id)
    )
    conn = await session.connection()
    now = utcnow()
    message = await insert_message(
        conn,
        conversation_id=conversation.id,
        position=(last if last is not None else -1) + 1,
        role=role,
        content=content,
        token_count=token_count,
        now=now,
    )
    await touch_conversation(conn, conversation, now)
    return message


async def conversation_for_turn(
    conn: TransactionConnection, owner_id: uuid.UUID, conversation_id: uuid.UUID
) -> tuple[Conversation, int | None] | None:
    """A conversation of this owner (detached from any session) with its last message's
    position, or None."""
    rows = await run(conn, _CONVERSATION_FOR_TURN, {"id": conversation_id, "owner": owner_id})
    if not rows:
        return None
    *values, last = rows[0]
    return Conversation(**dict(zip(_CONVERSATION_KEYS, values, strict=True))), last


async def conversation_for_session_key(
    conn: TransactionConnection, owner_id: uuid.UUID, session_key: str
) -> Conversation | None:
    """The conversation bound to an OpenAI-dialect session key, detached from any session."""
    rows = await run(conn, _CONVERSATION_FOR_SESSION, {"owner": owner_id, "key": session_key})
    return Conversation(**dict(zip(_CONVERSATION_KEYS, rows[0], strict=True))) if rows else None


async def recent_history(
    conn: TransactionConnection, conversation_id: uuid.UUID, *, limit: int
) -> list[tuple[str, str, int]]:
    """The newest `limit` user and assistant messages (role, content, token_count), oldest
    first."""
    rows = await run(conn, _RECENT_HISTORY, {"id": conversation_id, "limit": max(0, limit)})
    # Plain tuples (sqlite3's rows already are): they may be kept between turns.
    history = cast(list[tuple[str, str, int]], [tuple(r) for r in rows])
    history.reverse()
    return history


async def import_history(
    conn: TransactionConnection,
    conversation_id: uuid.UUID,
    messages: Sequence[ChatMessage],
    *,
    count: Callable[[str], int],
    now: datetime,
) -> int:
    """Store a client's earlier messages as the history of a conversation that has none
    (the caller holds its turn lock); return the last position written."""
    for position, message in enumerate(messages):
        await insert_message(
            conn,
            conversation_id=conversation_id,
            position=position,
            role=message.role,
            content=message.content,
            token_count=count(message.content),
            now=now,
        )
    return len(messages) - 1


async def insert_message(
    conn: TransactionConnection,
    *,
    conversation_id: uuid.UUID,
    position: int,
    role: str,
    content: str,
    token_count: int,
    now: datetime,
    model_tag: str | None = None,
    inference_time_ms: int | None = None,
    finish_reason: str | None = None,
) -> Message:
    """Insert a message at `position` (the caller holds the conversation's turn lock) and
    return it, detached from any session."""
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "conversation_id": conversation_id,
        "position": position,
        "role": role,
        "content": content,
        "token_count": token_count,
        "model_tag": model_tag,
        "inference_time_ms": inference_time_ms,
        "finish_reason": finish_reason,
        "created_at": now,
    }
    await run(conn, _INSERT_MESSAGE, values)
    return Message(**values)


async def touch_conversation(
    conn: TransactionConnection, conversation: Conversation, now: datetime, **changes: Any
) -> None:
    """Set a conversation's `updated_at` (and any changed columns) in the database and on
    the object."""
    statement = _touch_conversation(frozenset(changes))
    await run(
        conn,
        statement,
        {"cid": conversation.id, "now": now, **{f"new_{k}": v for k, v in changes.items()}},
    )
    for name, value in changes.items():
        setattr(conversation, name, value)
    conversation.updated_at = now


@functools.cache
def _touch_conversation(columns: frozenset[str]) -> Prepared:
    return Prepared(
        update(CONVERSATIONS)
        .where(_conv.id == bindparam("cid"))
        .values(updated_at=bindparam("now"), **{c: bindparam(f"new_{c}") for c in columns})
    )


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


async def list_bots(session: AsyncSession) -> Sequence[Bot]:
    """Every bot, by slug."""
    return (await session.scalars(select(Bot).order_by(Bot.slug))).all()
