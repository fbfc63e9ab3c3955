"""The engine every dialect calls: start a turn, sessions, owners, and shutting down."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from ..bounds import check_messages
from ..store import queries
from ..store.tables import Conversation
from .core import Core
from .request import BotRef, Messages, TurnRequest
from .stream import Turn


class Engine(Core):
    """The shared core every dialect calls: one turn pipeline over the store and the models."""

    def start(self, request: TurnRequest) -> Turn:
        """Start a turn in the background and return its handle (an async context manager
        that cancels the turn on exit); a message over the length limit is refused here."""
        history = request.target.history if isinstance(request.target, Messages) else ()
        texts = (m.content for m in (*history, *request.earlier, request.new))
        check_messages(texts, self.max_message_chars)
        return Turn(self, request)

    async def owner_id(self, name: str) -> uuid.UUID:
        """The id of the owner with this name, created on first use."""
        async with self.db.session() as session, session.begin():
            return (await queries.ensure_owner(session, name)).id

    async def session_conversation(
        self, *, owner_id: uuid.UUID, session_key: str, bot: BotRef | None = None
    ) -> Conversation:
        """The conversation bound to a session key (created on first use), bound to `bot`."""
        return await self.sessions.conversation(owner_id, session_key, bot=bot)

    @asynccontextmanager
    async def editing(self, conversation_id: uuid.UUID) -> AsyncIterator[AsyncSession]:
        """A write session for changing a conversation outside a turn (items, prompt,
        deletion) that waits for the conversation's running turn. Remembered histories need
        no care: they are checked against the last position, which such a change moves."""
        async with (
            self.locks.hold(conversation_id),
            self.db.session() as session,
            session.begin(),
        ):
            yield session

    async def reset_session(self, *, owner_id: uuid.UUID, session_key: str) -> None:
        """Unbind a session key so the next message starts a fresh conversation."""
        await self.sessions.reset(owner_id, session_key)

    async def close(self) -> None:
        """Cancel running turns (their partial replies are kept) and wait for them."""
        turns = list(self.running)
        for turn in turns:
            turn.cancel()
        await asyncio.gather(*(turn.wait() for turn in turns))
        await self.locks.close()
