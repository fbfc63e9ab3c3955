"""What a turn continues (a stored conversation, a session key or the client's own messages),
with its new input, sampling, model, bot, end user and dialect; and how it ended."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from typing import Literal

from ..backends.base import ChatMessage, FinishReason, GenerationParams, SamplingOptions
from ..knowledge.index import Hit
from ..store.tables import Conversation, Message

#: The title of a conversation until its first message names it.
DEFAULT_TITLE = "New conversation"


@dataclass(frozen=True, kw_only=True)
class Sampling(SamplingOptions):
    """What a request asked for; None leaves the choice to the bot or the model's defaults."""

    max_tokens: int | None = None

    def params(self, max_tokens: int) -> GenerationParams:
        """What the backend receives, with the reply length settled."""
        shared = {f.name: getattr(self, f.name) for f in fields(SamplingOptions)}
        return GenerationParams(max_tokens=max_tokens, **shared)


@dataclass(frozen=True)
class Stored:
    """Continue a stored conversation of the request's owner."""

    id: uuid.UUID


@dataclass(frozen=True)
class Session:
    """Continue the conversation bound to a session key, created on first use."""

    key: str


@dataclass(frozen=True)
class Messages:
    """The client's own history, oldest first, without system messages; nothing is stored
    but usage."""

    history: tuple[ChatMessage, ...] = ()
    #: The backend state these messages continue (a chain of responses), if any.
    session: str | None = None


Target = Stored | Session | Messages


@dataclass(frozen=True)
class BotRef:
    """A bot named by a request: by uid, by slug, or by either (`any`)."""

    ref: str
    by: Literal["uid", "slug", "any"] = "any"


@dataclass(frozen=True)
class TurnRequest:
    """One turn: what it continues, the new message and everything that shapes the reply."""

    owner_id: uuid.UUID
    target: Target
    new: ChatMessage
    sampling: Sampling = Sampling()
    #: A model name; unknown names fall back to the conversation's or default model.
    model: str | None = None
    #: On a session, binds its conversation to the bot; otherwise the bot to answer as.
    bot: BotRef | None = None
    #: System prompt parts of the request. On a stored conversation or session they
    #: replace its stored system prompt; a bot's prompt comes first.
    system: tuple[str, ...] = ()
    #: With a bot: its system prompt replaces the request's instead of preceding it.
    bot_replaces_system: bool = False
    #: Without a bot: search the default knowledge base with the last user message.
    retrieval: bool = False
    #: A max_tokens larger than half the window is lowered instead of reserved in full
    #: (the stateless dialects' rule; the others refuse a prompt that leaves no room).
    shrink_reply: bool = False
    #: Drop the oldest messages that do not fit the window; False: refuse instead.
    truncate: bool = True
    #: Messages the client sent before this one: stored as the conversation's history when
    #: it has no messages yet (a new session), ignored otherwise.
    earlier: tuple[ChatMessage, ...] = ()
    #: Recorded with the usage figures.
    user_id: str | None = None
    dialect: str | None = None


@dataclass(frozen=True, kw_only=True)
class Reply:
    """A reply's text, how it ended and its token counts."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, kw_only=True)
class Generated(Reply):
    """What the backend produced, how it ended and how long it took."""

    elapsed_ms: int


@dataclass(frozen=True, kw_only=True)
class TurnResult(Reply):
    """How a turn ended; the stored messages when it was persisted."""

    model: str
    knowledge: tuple[Hit, ...] = ()
    conversation: Conversation | None = None
    user_message: Message | None = None
    assistant_message: Message | None = None
