"""The newest messages of recently active conversations, kept in memory between turns.

Reading a conversation's history is most of a turn's cost once the conversation has a
few dozen messages. Stored messages never change and only turns
append to a conversation, under its turn lock; so an entry that ends at the
conversation's last stored position (read in the turn's own transaction, under the
lock) is exactly what the database holds, whichever process wrote it. An entry that
ends anywhere else is not used.

Messages are kept as (role, content, token count) tuples of strings and numbers, which
the garbage collector stops tracking: a large cache then adds nothing to its passes.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass

#: A stored message as a turn needs it: (role, content, token count).
Row = tuple[str, str, int]

#: Characters of message text kept for all conversations together (each message also
#: counts ROW_OVERHEAD for its objects); the least recently used are forgotten first.
MAX_CHARS = 64 * 2**20
#: What a kept message costs beyond its text: its tuple, string and number objects.
ROW_OVERHEAD = 160


def _cost(row: Row) -> int:
    return len(row[1]) + ROW_OVERHEAD


#: Conversations remembered at most.
MAX_CONVERSATIONS = 4096


@dataclass
class _Entry:
    last_position: int
    #: The newest user and assistant messages, oldest first.
    items: list[Row]
    #: True when `items` holds every user and assistant message of the conversation.
    complete: bool
    chars: int


class HistoryCache:
    """Per-process memory of conversations' newest messages, checked against the store."""

    def __init__(
        self, *, max_chars: int = MAX_CHARS, max_conversations: int = MAX_CONVERSATIONS
    ) -> None:
        self.max_chars = max_chars
        self.max_conversations = max_conversations
        self.chars = 0
        self._entries: OrderedDict[uuid.UUID, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, conversation_id: uuid.UUID, last_position: int | None, limit: int
    ) -> list[Row] | None:
        """The newest `limit` messages if the entry ends at `last_position` and has them."""
        entry = self._entries.get(conversation_id)
        if entry is None or last_position is None or entry.last_position != last_position:
            return None
        if limit <= 0 or (not entry.complete and len(entry.items) < limit):
            return None
        self._entries.move_to_end(conversation_id)
        return entry.items[-limit:]

    def put(
        self,
        conversation_id: uuid.UUID,
        last_position: int,
        items: list[Row],
        *,
        complete: bool,
        keep: int,
    ) -> None:
        """Remember a conversation's newest messages ending at `last_position` (at most
        `keep` of them)."""
        self.drop(conversation_id)
        if len(items) > keep:
            complete = False
        items = items[-keep:] if keep > 0 else []  # a copy: the caller keeps its own list
        entry = _Entry(last_position, items, complete, sum(_cost(i) for i in items))
        self._entries[conversation_id] = entry
        self.chars += entry.chars
        self._shrink()

    def append(
        self,
        conversation_id: uuid.UUID,
        after: int,
        item: Row,
        position: int,
        *,
        keep: int,
    ) -> None:
        """Add a message stored at `position` to an entry that ends at `after`; an entry
        that ends elsewhere is dropped."""
        entry = self._entries.get(conversation_id)
        if entry is None:
            return
        if entry.last_position != after:
            self.drop(conversation_id)
            return
        entry.items.append(item)
        entry.last_position = position
        added = _cost(item)
        while len(entry.items) > keep:
            added -= _cost(entry.items.pop(0))
            entry.complete = False
        entry.chars += added
        self.chars += added
        self._entries.move_to_end(conversation_id)
        self._shrink()

    def drop(self, conversation_id: uuid.UUID) -> None:
        """Forget a conversation."""
        entry = self._entries.pop(conversation_id, None)
        if entry is not None:
            self.chars -= entry.chars

    def _shrink(self) -> None:
        while self._entries and (
            self.chars > self.max_chars or len(self._entries) > self.max_conversations
        ):
            _, entry = self._entries.popitem(last=False)
            self.chars -= entry.chars
