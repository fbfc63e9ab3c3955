"""A persisted turn's two writes (the user message, then the reply) and every turn's usage."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .. import usage
from ..backends.base import ChatMessage
from ..bounds import tokenising
from ..errors import NotFound, SessionMoved
from ..knowledge.index import Hit
from ..store import queries
from ..store.db import Database, TransactionConnection
from ..store.tables import Conversation, Message, utcnow
from .context import HistoryItem
from .core import Core
from .plan import Plan, load_bot, retrieve, settle
from .request import DEFAULT_TITLE, Generated, Reply, Session, TurnRequest, TurnResult

TITLE_LENGTH = 80


@dataclass(frozen=True)
class Opened:
    """A persisted turn after its user message is stored."""

    conversation: Conversation
    plan: Plan
    hits: list[Hit]
    history: list[HistoryItem]
    user_message: Message
    #: Messages the window can hold at most (every message costs at least one token).
    keep: int


def _changes(request: TurnRequest, conversation: Conversation) -> dict[str, str]:
    changes: dict[str, str] = {}
    if request.system:
        prompt = "\n\n".join(request.system)
        if prompt != conversation.system_prompt:
            changes["system_prompt"] = prompt
    if not conversation.title or conversation.title == DEFAULT_TITLE:
        title = " ".join(request.new.content.split())[:TITLE_LENGTH]
        if title:
            changes["title"] = title
    return changes


async def _conversation(
    conn: TransactionConnection, request: TurnRequest, conversation_id: Any
) -> tuple[Conversation, int | None]:
    """The conversation a turn continues and its last position, still bound to the session
    key the turn named (else SessionMoved: the caller looks the key up again)."""
    found = await queries.conversation_for_turn(conn, request.owner_id, conversation_id)
    target = request.target
    if isinstance(target, Session) and (found is None or found[0].session_key != target.key):
        raise SessionMoved("The session moved to another conversation; try again.")
    if found is None:
        raise NotFound("Conversation not found")
    return found


async def open_turn(engine: Core, request: TurnRequest, conversation_id: Any) -> Opened:
    """Check the conversation, settle the plan and store the user message (under the lock)."""
    # Core statements on one connection per transaction: this runs for every message.
    async with engine.db.begin() as conn:
        conversation, last_position = await _conversation(conn, request, conversation_id)
        bot = await load_bot(engine.db, conversation.bot_id)
        plan = await tokenising(
            len(request.new.content),
            settle,
            engine.models,
            request,
            bot=bot,
            stored_system=conversation.system_prompt,
            stored_model=conversation.model_tag,
        )
        hits = await retrieve(engine.db, request, bot, [request.new])
        keep = plan.backend.context_length - plan.reserve
        last = last_position if last_position is not None else -1
        if last_position is None and request.earlier:
            last = await queries.import_history(
                conn,
                conversation.id,
                request.earlier,
                count=plan.backend.count_tokens,
                now=utcnow(),
            )
        rows = engine.history.get(conversation.id, last, keep)
        loaded = rows is None
        if rows is None:
            rows = await queries.recent_history(conn, conversation.id, limit=keep)
        content = request.new.content
        user_tokens = await tokenising(len(content), plan.backend.count_tokens, content)
        now = utcnow()
        user_message = await queries.insert_message(
            conn,
            conversation_id=conversation.id,
            position=last + 1,
            role="user",
            content=request.new.content,
            token_count=user_tokens,
            now=now,
        )
        await queries.touch_conversation(conn, conversation, now, **_changes(request, conversation))
    if loaded:
        engine.history.put(conversation.id, last, rows, complete=len(rows) < keep, keep=keep)
    engine.history.append(
        conversation.id,
        last,
        ("user", user_message.content, user_message.token_count),
        user_message.position,
        keep=keep,
    )
    history = [
        HistoryItem(ChatMessage(role, content), tokens)  # type: ignore[arg-type]
        for role, content, tokens in rows
    ]
    return Opened(conversation, plan, hits, history, user_message, keep)


async def close_turn(
    engine: Core, request: TurnRequest, opened: Opened, generated: Generated
) -> TurnResult:
    """Store the reply (whatever the ending) and the usage figures."""
    conversation, plan = opened.conversation, opened.plan
    async with engine.db.begin() as conn:
        now = utcnow()
        assistant = await queries.insert_message(
            conn,
            conversation_id=conversation.id,
            # The turn lock is still held (across processes too), so nothing else
            # has written to this conversation since the user message.
            position=opened.user_message.position + 1,
            role="assistant",
            content=generated.text,
            token_count=plan.backend.count_tokens(generated.text),
            model_tag=plan.model.spec.name,
            inference_time_ms=generated.elapsed_ms,
            finish_reason=generated.finish_reason,
            now=now,
        )
        await queries.touch_conversation(conn, conversation, now)
        await _usage(conn, request, plan, generated, now)
    engine.history.append(
        conversation.id,
        opened.user_message.position,
        ("assistant", assistant.content, assistant.token_count),
        assistant.position,
        keep=opened.keep,
    )
    return result(
        plan,
        generated,
        conversation=conversation,
        user_message=opened.user_message,
        assistant_message=assistant,
    )


async def _usage(
    conn: TransactionConnection,
    request: TurnRequest,
    plan: Plan,
    generated: Generated,
    now: Any,
) -> None:
    await usage.add(
        conn,
        owner_id=request.owner_id,
        bot_id=plan.bot.uid if plan.bot is not None else None,
        model=plan.model.spec.name,
        user_id=request.user_id,
        dialect=request.dialect,
        prompt_tokens=generated.prompt_tokens,
        completion_tokens=generated.completion_tokens,
        now=now,
    )


async def record_usage(
    db: Database, request: TurnRequest, plan: Plan, generated: Generated
) -> None:
    """Store a turn's usage figures alone (a turn that keeps nothing else)."""
    async with db.begin() as conn:
        await _usage(conn, request, plan, generated, utcnow())


def result(plan: Plan, generated: Generated, **stored: Any) -> TurnResult:
    """The turn's result from its plan and what was generated."""
    reply = {f.name: getattr(generated, f.name) for f in fields(Reply)}
    return TurnResult(model=plan.model.spec.name, **reply, **stored)
