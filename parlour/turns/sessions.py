"""Session keys and the conversations they name: remembered per process, checked by each turn."""

from __future__ import annotations

import uuid

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from ..bounds import tokenising
from ..errors import InvalidRequest
from ..models import ModelRegistry
from ..store import queries
from ..store.db import Database
from ..store.tables import Conversation
from .plan import load_bot, settle
from .request import DEFAULT_TITLE, BotRef, Session, TurnRequest

#: Session keys whose conversation this process remembers (forgotten all at once when full).
SESSION_CACHE_SIZE = 100_000


class Sessions:
    """Which conversation each (owner, session key) names, as last seen by this process.

    A turn re-checks the binding in the transaction that stores its message, so a key that
    /new moved or whose conversation was deleted, here or in another process, costs a retry
    and never puts a message in the wrong conversation.
    """

    def __init__(self, *, db: Database, models: ModelRegistry) -> None:
        self._db = db
        self._models = models
        self._known: dict[tuple[uuid.UUID, str], uuid.UUID] = {}

    async def conversation_id(self, request: TurnRequest, *, fresh: bool) -> uuid.UUID:
        """The conversation a session turn continues, created (once the new message is known
        to fit) on first use."""
        assert isinstance(request.target, Session)
        key = (request.owner_id, request.target.key)
        known = None if fresh or request.bot is not None else self._known.get(key)
        if known is not None:
            return known
        conversation = await self.conversation(
            request.owner_id, request.target.key, bot=request.bot, first=request
        )
        if len(self._known) >= SESSION_CACHE_SIZE:
            self._known.clear()
        self._known[key] = conversation.id
        return conversation.id

    async def conversation(
        self,
        owner_id: uuid.UUID,
        session_key: str,
        *,
        bot: BotRef | None = None,
        first: TurnRequest | None = None,
    ) -> Conversation:
        """The conversation bound to a session key, bound to `bot` when given; a new one is
        created only once `first` (the turn that opens it) is known to fit."""
        chosen = await load_bot(self._db, bot)
        for _ in range(3):
            async with self._db.begin_read() as conn:
                found = await queries.conversation_for_session_key(conn, owner_id, session_key)
            if found is not None:
                if chosen is not None and found.bot_id != chosen.uid:
                    async with self._db.session() as session, session.begin():
                        await session.execute(
                            update(Conversation)
                            .where(Conversation.id == found.id)
                            .values(bot_id=chosen.uid)
                        )
                    found.bot_id = chosen.uid
                return found
            plan = (
                await tokenising(len(first.new.content), settle, self._models, first, bot=chosen)
                if first is not None
                else None
            )
            model = plan.model if plan is not None else self._models.get(None)
            try:
                async with self._db.session() as session, session.begin():
                    return await queries.create_conversation(
                        session,
                        owner_id=owner_id,
                        title=DEFAULT_TITLE,
                        model_tag=model.spec.name,
                        session_key=session_key,
                        bot_id=chosen.uid if chosen is not None else None,
                    )
            except IntegrityError:
                continue  # another request created it first; read theirs
        raise InvalidRequest("Could not open the session; try again.")  # pragma: no cover

    def forget(self, owner_id: uuid.UUID, session_key: str) -> None:
        """Drop what this process remembers of a session key."""
        self._known.pop((owner_id, session_key), None)

    async def reset(self, owner_id: uuid.UUID, session_key: str) -> None:
        """Unbind a session key so the next message starts a fresh conversation."""
        self.forget(owner_id, session_key)
        async with self._db.session() as session, session.begin():
            await session.execute(
                update(Conversation)
                .where(Conversation.owner_id == owner_id, Conversation.session_key == session_key)
                .values(session_key=None)
            )
