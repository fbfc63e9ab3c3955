"""Queries of the Responses API: stored responses, their event logs, conversation metadata."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .tables import ConversationMetadata, ResponseEvent, StoredResponse

#: How many ancestors a chain may have; a cycle is impossible, this only bounds the walk.
MAX_CHAIN = 10_000


async def get_response(
    session: AsyncSession, owner_id: uuid.UUID, response_id: str
) -> StoredResponse | None:
    """A response of this owner that was not deleted, or None."""
    return await session.scalar(
        select(StoredResponse).where(
            StoredResponse.id == response_id,
            StoredResponse.owner_id == owner_id,
            StoredResponse.deleted.is_(False),
        )
    )


async def chain(session: AsyncSession, response: StoredResponse) -> list[StoredResponse]:
    """A response's ancestors and itself, oldest first (deleted ancestors included), read
    in one recursive query."""
    links = (
        select(StoredResponse.id, StoredResponse.parent_id, literal(0).label("depth"))
        .where(StoredResponse.id == response.id)
        .cte("links", recursive=True)
    )
    links = links.union_all(
        select(StoredResponse.id, StoredResponse.parent_id, links.c.depth + 1)
        .join(links, StoredResponse.id == links.c.parent_id)
        .where(links.c.depth < MAX_CHAIN)
    )
    rows = await session.scalars(
        select(StoredResponse)
        .join(links, StoredResponse.id == links.c.id)
        .order_by(links.c.depth.desc())
    )
    return list(rows.all())


async def update_response(session: AsyncSession, response_id: str, **values: Any) -> None:
    """Set columns of a response."""
    await session.execute(
        update(StoredResponse).where(StoredResponse.id == response_id).values(**values)
    )


#: The columns a running response changes; written with each batch of its events.
PROGRESS = (
    "status",
    "model",
    "output_text",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "incomplete_reason",
    "error",
    "completed_at",
)


async def save_progress(session: AsyncSession, row: StoredResponse) -> None:
    """Write a running response's PROGRESS columns as the row in memory holds them."""
    await update_response(session, row.id, **{name: getattr(row, name) for name in PROGRESS})


async def append_events(
    session: AsyncSession, response_id: str, events: Sequence[dict[str, Any]]
) -> None:
    """Add events to a response's log; each carries its own `sequence_number`."""
    session.add_all(
        ResponseEvent(response_id=response_id, sequence=e["sequence_number"], event=e)
        for e in events
    )
    await session.flush()


async def events_after(
    session: AsyncSession, response_id: str, after: int, *, limit: int = 1000
) -> list[dict[str, Any]]:
    """The logged events with a sequence number above `after`, in order."""
    rows = await session.scalars(
        select(ResponseEvent.event)
        .where(ResponseEvent.response_id == response_id, ResponseEvent.sequence > after)
        .order_by(ResponseEvent.sequence)
        .limit(limit)
    )
    return list(rows.all())


async def last_sequence(session: AsyncSession, response_id: str) -> int:
    """The highest logged sequence number, -1 when there is none."""
    value = await session.scalar(
        select(func.max(ResponseEvent.sequence)).where(ResponseEvent.response_id == response_id)
    )
    return -1 if value is None else int(value)


async def delete_response(session: AsyncSession, response_id: str) -> None:
    """Hide a response (its successors keep their context) and drop its event log."""
    await session.execute(delete(ResponseEvent).where(ResponseEvent.response_id == response_id))
    await update_response(session, response_id, deleted=True)


async def conversation_metadata(
    session: AsyncSession, conversation_id: uuid.UUID
) -> dict[str, str]:
    """A conversation's Conversations-API metadata ({} when none was set)."""
    row = await session.get(ConversationMetadata, conversation_id)
    return dict(row.data) if row is not None else {}


async def set_conversation_metadata(
    session: AsyncSession, conversation_id: uuid.UUID, data: dict[str, str]
) -> None:
    """Replace a conversation's metadata."""
    row = await session.get(ConversationMetadata, conversation_id)
    if row is None:
        session.add(ConversationMetadata(conversation_id=conversation_id, data=data))
    else:
        row.data = data
    await session.flush()
