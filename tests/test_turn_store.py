"""The store behind every turn: direct SQLite statements, the write lock, checkpoints, and
the per-process memory of sessions and history checked against what other servers wrote."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from parlour.app import create_app
from parlour.settings import Settings
from parlour.store import queries
from parlour.store.db import Database
from parlour.store.tables import Conversation, Message, Usage, utcnow
from parlour.turns.history import ROW_OVERHEAD, HistoryCache

URL = "/v1/chat/completions"


def ask(text: str) -> dict[str, Any]:
    """A chat request with one user message."""
    return {"messages": [{"role": "user", "content": text}]}


async def say(client: httpx.AsyncClient, session: str, text: str) -> str:
    """One turn on a session; the reply's text."""
    r = await client.post(URL, headers={"x-session-key": session}, json=ask(text))
    assert r.status_code == 200, r.text
    content: str = r.json()["choices"][0]["message"]["content"]
    return content


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A second app on the same database, as another server process would be."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c


async def until(condition: Callable[[], bool], *, rounds: int = 500) -> None:
    """Let the event loop run until `condition` holds (bounded, never a clock check)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def sqlite_file(settings: Settings, database_url: str | None) -> Path:
    """The SQLite file of a test (these tests are about SQLite only)."""
    if database_url is not None:
        pytest.skip("SQLite only")
    return settings.data_dir / "parlour.db"


# --- statements -------------------------------------------------------------------------


async def test_turn_statements_store_what_the_orm_reads(app: FastAPI) -> None:
    db: Database = app.state.db
    owner_id = app.state.local_principal.owner_id
    async with db.session() as session, session.begin():
        made = await queries.create_conversation(
            session, owner_id=owner_id, title="t", model_tag="scripted", session_key="k"
        )
    now = utcnow()
    async with db.begin() as conn:
        found = await queries.conversation_for_turn(conn, owner_id, made.id)
        assert found is not None
        conversation, last = found
        assert last is None
        message = await queries.insert_message(
            conn,
            conversation_id=made.id,
            position=0,
            role="assistant",
            content="héllo ✓",
            token_count=3,
            now=now,
            model_tag="scripted",
            inference_time_ms=12,
            finish_reason="length",
        )
        await queries.touch_conversation(conn, conversation, now, title="renamed")
    async with db.begin_read() as conn:
        again = await queries.conversation_for_turn(conn, owner_id, made.id)
        by_key = await queries.conversation_for_session_key(conn, owner_id, "k")
        history = await queries.recent_history(conn, made.id, limit=5)
        assert await queries.conversation_for_turn(conn, uuid.uuid4(), made.id) is None
    assert again is not None and again[1] == 0
    assert by_key is not None and by_key.id == made.id
    assert history == [("assistant", "héllo ✓", 3)]
    async with db.read() as session:
        row = await session.get(Message, message.id)
        stored = await session.get(Conversation, made.id)
    assert row is not None and stored is not None
    columns = [c.key for c in Message.__table__.columns]
    assert {c: getattr(row, c) for c in columns} == {c: getattr(message, c) for c in columns}
    assert row.created_at == now and row.created_at.tzinfo is not None
    assert stored.title == "renamed" == again[0].title
    assert stored.updated_at == now == again[0].updated_at
    assert again[0].created_at == made.created_at and again[0].owner_id == owner_id


async def test_a_turn_records_its_usage(app: FastAPI, client: httpx.AsyncClient) -> None:
    assert await say(client, "u", "count me") == "Echo 1: count me"
    async with app.state.db.read() as session:
        rows = list(await session.scalars(select(Usage)))
    assert [(u.model, u.dialect, u.completion_tokens) for u in rows] == [("scripted", "openai", 4)]
    assert rows[0].prompt_tokens > 0 and rows[0].created_at.tzinfo is not None


# --- SQLite: locks and checkpoints --------------------------------------------------------


async def test_a_writer_elsewhere_is_waited_for_without_blocking(
    app: FastAPI, client: httpx.AsyncClient, settings: Settings, database_url: str | None
) -> None:
    path = sqlite_file(settings, database_url)
    assert await say(client, "w", "first") == "Echo 1: first"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # as a CLI command in another process would
    try:
        turn = asyncio.create_task(say(client, "w", "second"))
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        # The loop keeps running other work while the turn waits for the lock.
        await until(lambda: ticks > 50)
        assert not turn.done()
    finally:
        other.execute("COMMIT")
        other.close()
    assert await turn == "Echo 2: second"
    ticker.cancel()


async def test_writers_in_one_process_take_turns(
    app: FastAPI, settings: Settings, database_url: str | None
) -> None:
    sqlite_file(settings, database_url)
    db: Database = app.state.db
    owner_id = app.state.local_principal.owner_id
    async with db.session() as session, session.begin():
        made = await queries.create_conversation(
            session, owner_id=owner_id, title="t", model_tag="scripted"
        )
    holding, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def first() -> None:
        async with db.begin() as conn:
            await queries.insert_message(
                conn,
                conversation_id=made.id,
                position=0,
                role="user",
                content="a",
                token_count=1,
                now=utcnow(),
            )
            holding.set()
            await release.wait()  # keeps the write transaction open across an await
            order.append("first")

    async def second() -> None:
        async with db.session() as session, session.begin():
            session.add(Conversation(owner_id=owner_id, title="u", model_tag="scripted"))
        order.append("second")

    one = asyncio.create_task(first())
    await holding.wait()
    two = asyncio.create_task(second())
    await asyncio.sleep(0.05)
    assert order == [] and not two.done()
    release.set()
    await asyncio.gather(one, two)
    assert order == ["first", "second"]


async def test_the_log_reaches_the_database_file(
    client: httpx.AsyncClient, settings: Settings, database_url: str | None
) -> None:
    path = sqlite_file(settings, database_url)

    def in_file() -> int:
        # immutable=1 reads the database file alone, ignoring the write-ahead log.
        connection = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            return int(connection.execute("SELECT count(*) FROM messages").fetchone()[0])
        except sqlite3.OperationalError:  # not even the tables are in the file yet
            return -1
        except sqlite3.DatabaseError:  # read while a checkpoint was copying pages
            return -1
        finally:
            connection.close()

    for i in range(3):
        await say(client, "log", f"turn {i}")
    # No connection checkpoints by itself; the worker thread copies the log soon after.
    await until(lambda: in_file() == 6)


# --- memory checked against other servers ---------------------------------------------


async def test_history_follows_turns_written_by_another_server(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    assert await say(client, "shared", "one") == "Echo 1: one"
    assert await say(client, "shared", "two") == "Echo 2: two"
    async with serving(settings) as other:
        assert await say(other, "shared", "three") == "Echo 3: three"
    # This server remembered the history up to turn two; turn three is read, not missed.
    assert await say(client, "shared", "four") == "Echo 4: four"


async def test_a_session_moved_by_another_server_is_followed(
    app: FastAPI, client: httpx.AsyncClient, settings: Settings
) -> None:
    assert await say(client, "moving", "old") == "Echo 1: old"
    async with serving(settings) as other:
        assert await say(other, "moving", "/new") == "Started a new session."
    # This server remembered the old conversation; the turn goes to the new one.
    assert await say(client, "moving", "fresh") == "Echo 1: fresh"
    async with app.state.db.read() as session:
        rows = list(await session.scalars(select(Conversation).order_by(Conversation.created_at)))
        counts = [len(await queries.list_messages(session, c.id)) for c in rows]
    assert [c.session_key for c in rows] == [None, "moving"]
    assert counts == [2, 2]


async def test_a_deleted_conversation_starts_the_session_afresh(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    assert await say(client, "gone", "before") == "Echo 1: before"
    async with serving(settings) as other:
        listed = (await other.get("/conversations")).json()
        assert (await other.delete(f"/conversations/{listed[0]['id']}")).status_code == 204
    assert await say(client, "gone", "after") == "Echo 1: after"


# --- the history cache itself -----------------------------------------------------------


def item(text: str, role: str = "user") -> tuple[str, str, int]:
    """A stored message of one token per word."""
    return (role, text, len(text.split()))


def test_history_is_used_only_where_it_ends() -> None:
    cache, cid = HistoryCache(), uuid.uuid4()
    cache.put(cid, 3, [item("a"), item("b", "assistant")], complete=True, keep=10)
    assert cache.get(cid, 2, 10) is None  # the store has fewer messages: not this history
    assert cache.get(cid, 4, 10) is None  # someone else wrote since
    assert [i[1] for i in cache.get(cid, 3, 10) or []] == ["a", "b"]
    cache.append(cid, 3, item("c"), 4, keep=10)
    assert [i[1] for i in cache.get(cid, 4, 10) or []] == ["a", "b", "c"]
    cache.append(cid, 9, item("d"), 10, keep=10)  # does not follow on: forgotten
    assert cache.get(cid, 4, 10) is None and len(cache) == 0


def test_history_keeps_only_what_can_be_asked_for() -> None:
    cache, cid = HistoryCache(), uuid.uuid4()
    cache.put(cid, 5, [item(str(i)) for i in range(6)], complete=True, keep=4)
    assert [i[1] for i in cache.get(cid, 5, 3) or []] == ["3", "4", "5"]
    assert cache.get(cid, 5, 5) is None  # trimmed to four, so five are not known
    returned = cache.get(cid, 5, 4)
    assert returned is not None
    returned.append(item("mine"))  # the caller's list is its own
    assert len(cache.get(cid, 5, 4) or []) == 4


def test_history_memory_is_bounded() -> None:
    row = 30 + ROW_OVERHEAD
    cache = HistoryCache(max_chars=3 * row + 10, max_conversations=3)
    ids = [uuid.uuid4() for _ in range(5)]
    for cid in ids:
        cache.put(cid, 0, [item("x" * 30)], complete=True, keep=10)
    assert len(cache) == 3 and cache.chars == 3 * row
    assert cache.get(ids[0], 0, 10) is None and cache.get(ids[4], 0, 10) is not None
    cache.put(ids[4], 1, [item("y" * 3 * row)], complete=True, keep=10)
    assert cache.chars <= 3 * row + 10


def test_history_counts_each_message_not_only_its_text() -> None:
    # Many empty messages still cost memory: the bound holds for them too.
    cache = HistoryCache(max_chars=100 * ROW_OVERHEAD)
    cid = uuid.uuid4()
    cache.put(cid, 0, [item("")], complete=True, keep=100_000)
    for position in range(1, 1000):
        cache.append(cid, position - 1, item(""), position, keep=100_000)
    assert cache.chars <= 100 * ROW_OVERHEAD
    assert cache.get(cid, 999, 1000) is None  # a thousand messages do not fit that bound
