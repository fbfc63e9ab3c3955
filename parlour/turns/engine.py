"""The engine every dialect calls: start a turn, sessions, owners, and shutting down."""

from __future__ import annotations

import asyncio
import uuid

from ..models import ModelRegistry
from ..store import queries
from ..store.db import Database
from ..store.tables import Conversation
from .history import HistoryCache
from .locks import turn_locks
from .request import BotRef, TurnRequest
from .sessions import Sessions
from .stream import Turn


class Engine:
    """The shared core: one turn pipeline over the store and the models."""

    def __init__(self, *, db: Database, models: ModelRegistry) -> None:
        self.db = db
        self.models = models
        self.locks = turn_locks(db.url, is_sqlite=db.is_sqlite)
        self.running: set[Turn] = set()
        self.history = HistoryCache()
        self.sessions = Sessions(self)

    def start(self, request: TurnRequest) -> Turn:
        """Start a turn in the background and return its handle (an async context manager
        that cancels the turn on exit)."""
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
