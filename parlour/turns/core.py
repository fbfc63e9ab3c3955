"""What every turn shares: the store, the models, turn locks, the history cache and sessions."""

from __future__ import annotations

from typing import Protocol

from ..models import ModelRegistry
from ..ops.observe import Observer
from ..store.db import Database
from .file_locks import turn_locks
from .history import MAX_CHARS, HistoryCache
from .sessions import Sessions


class Running(Protocol):
    """A turn in progress, as shutdown sees it."""

    def cancel(self) -> None:
        """Stop it; a partial reply is kept."""

    async def wait(self) -> None:
        """Wait for it to end."""


class Core:
    """The shared state of the turn pipeline, owned by the engine."""

    def __init__(
        self,
        *,
        db: Database,
        models: ModelRegistry,
        max_message_chars: int | None = None,
        history_chars: int = MAX_CHARS,
    ) -> None:
        self.db = db
        self.models = models
        #: The longest message a turn accepts, in characters (None: no limit).
        self.max_message_chars = max_message_chars
        self.locks = turn_locks(db.url, is_sqlite=db.is_sqlite)
        self.history = HistoryCache(max_chars=history_chars)
        self.sessions = Sessions(db=db, models=models)
        self.running: set[Running] = set()
        #: Told about every generation (parlour.ops.metrics and the token meter set one).
        self.observer: Observer = Observer()
