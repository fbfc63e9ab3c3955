"""Server-side sessions of the OpenAI dialect: memory, keys, new turns, commands, concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from parlour.app import create_app
from parlour.backends.base import ChatMessage
from parlour.backends.scripted import ScriptedBackend
from parlour.settings import Settings
from parlour.store import queries
from parlour.store.tables import Conversation, Message

URL = "/v1/chat/completions"


def key(value: str) -> dict[str, str]:
    """Headers naming a session."""
    return {"x-session-key": value}


def user(text: str) -> dict[str, Any]:
    """A user message."""
    return {"role": "user", "content": text}


def sent(scripted: ScriptedBackend, call: int = -1) -> list[tuple[str, str]]:
    """(role, content) of every message the backend was given in one call."""
    return [(m.role, m.content) for m in scripted.calls[call].messages]


async def reply(client: httpx.AsyncClient, session: str, *messages: dict[str, Any]) -> str:
    """POST a turn and return the assistant's text."""
    r = await client.post(URL, headers=key(session), json={"messages": list(messages)})
    assert r.status_code == 200, r.text
    content: str = r.json()["choices"][0]["message"]["content"]
    return content


async def conversations(app: FastAPI) -> list[Conversation]:
    """Every stored conversation, oldest first."""
    async with app.state.db.session() as session:
        rows = await session.scalars(select(Conversation).order_by(Conversation.created_at))
        return list(rows)


async def stored(app: FastAPI, conversation: Conversation | None) -> Sequence[Message]:
    """A conversation's stored messages, oldest first."""
    assert conversation is not None
    async with app.state.db.session() as session:
        return await queries.list_messages(session, conversation.id)


async def by_key(app: FastAPI, session_key: str) -> Conversation | None:
    """The conversation currently bound to a session key."""
    found = [c for c in await conversations(app) if c.session_key == session_key]
    assert len(found) <= 1
    return found[0] if found else None


# --- memory and keys ------------------------------------------------------------------


async def test_session_remembers(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    assert await reply(client, "wx:dm:user_alice", user("Hello, who are you?")) == (
        "Echo 1: Hello, who are you?"
    )
    assert await reply(client, "wx:dm:user_alice", user("What did I just ask?")) == (
        "Echo 2: What did I just ask?"
    )
    assert sent(scripted) == [
        ("user", "Hello, who are you?"),
        ("assistant", "Echo 1: Hello, who are you?"),
        ("user", "What did I just ask?"),
    ]
    messages = await stored(app, await by_key(app, "wx:dm:user_alice"))
    assert [(m.role, m.position) for m in messages] == [
        ("user", 0),
        ("assistant", 1),
        ("user", 2),
        ("assistant", 3),
    ]
    assert messages[1].finish_reason == "stop" and messages[1].model_tag == "scripted"
    assert messages[0].token_count == 4 and messages[1].token_count == 6


async def test_different_keys_are_isolated(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await reply(client, "wx:dm:user_alice", user("secret plan"))
    assert await reply(client, "wx:dm:user_bob", user("What did I ask?")) == (
        "Echo 1: What did I ask?"
    )
    assert sent(scripted) == [("user", "What did I ask?")]
    await reply(client, "wx:group:group_abc:user:user_alice", user("Summarize"))
    assert sent(scripted) == [("user", "Summarize")]


async def test_keys_are_kept_exactly(app: FastAPI, client: httpx.AsyncClient) -> None:
    keys = ["wx:dm:a", "wx_dm_a", "WX:DM:A", "wx:dm:a:", "x" * 256]
    for k in keys:
        assert await reply(client, k, user("hi")) == "Echo 1: hi", k
    assert await reply(client, "wx:dm:a", user("again")) == "Echo 2: again"
    assert sorted(c.session_key or "" for c in await conversations(app)) == sorted(keys)


async def test_utf8_keys_are_kept_as_written(app: FastAPI, client: httpx.AsyncClient) -> None:
    # httpx only sends ASCII header strings; curl and others send UTF-8 bytes as they are.
    keys = ["wx:dm:张三", "wx:group:…:user:bob", "wx:dm:José", "é" * 256]
    for k in keys:
        r = await client.post(
            URL, headers=[(b"x-session-key", k.encode())], json={"messages": [user("hi")]}
        )
        assert r.status_code == 200, (k, r.text)
        assert r.json()["choices"][0]["message"]["content"] == "Echo 1: hi"
    assert sorted(c.session_key or "" for c in await conversations(app)) == sorted(keys)


# --- what the new turn is -------------------------------------------------------------


async def test_full_history_from_the_client_is_not_duplicated(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    first = await reply(client, "s", user("first question"))
    second = await reply(
        client,
        "s",
        user("first question"),
        {"role": "assistant", "content": first},
        user("second question"),
    )
    assert second == "Echo 2: second question"
    assert sent(scripted) == [
        ("user", "first question"),
        ("assistant", "Echo 1: first question"),
        ("user", "second question"),
    ]
    messages = await stored(app, await by_key(app, "s"))
    assert [m.content for m in messages] == [
        "first question",
        "Echo 1: first question",
        "second question",
        "Echo 2: second question",
    ]


async def test_user_messages_after_the_last_assistant_form_the_turn(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await reply(client, "s", user("hello"))
    await reply(
        client,
        "s",
        user("old, already answered"),
        {"role": "assistant", "content": "an answer the server never gave"},
        user("part one"),
        user("part two"),
    )
    # The session has messages: what the client resends before its last assistant
    # message is ignored, and the server's own history is used.
    assert sent(scripted) == [
        ("user", "hello"),
        ("assistant", "Echo 1: hello"),
        ("user", "part one\n\npart two"),
    ]
    messages = await stored(app, await by_key(app, "s"))
    assert [(m.role, m.content) for m in messages] == [
        ("user", "hello"),
        ("assistant", "Echo 1: hello"),
        ("user", "part one\n\npart two"),
        ("assistant", "Echo 2: part one\n\npart two"),
    ]


async def test_a_new_session_stores_the_history_the_client_sends(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await reply(
        client,
        "ada",
        {"role": "system", "content": "Be brief."},
        user("My name is Ada."),
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        user("What is my name?"),
    )
    history = [
        ("user", "My name is Ada."),
        ("assistant", "Nice to meet you, Ada!"),
        ("user", "What is my name?"),
    ]
    assert sent(scripted) == [("system", "Be brief."), *history]
    messages = await stored(app, await by_key(app, "ada"))
    assert [(m.role, m.content) for m in messages] == [
        *history,
        ("assistant", "Echo 2: What is my name?"),
    ]
    assert all(m.token_count > 0 for m in messages)
    # From then on the stored messages are the context; the resent ones are not stored twice.
    resent = [{"role": r, "content": c} for r, c in history]
    await reply(client, "ada", *resent, {"role": "assistant", "content": "Echo 2"}, user("And?"))
    assert [content for _, content in sent(scripted)][-3:] == [
        "What is my name?",
        "Echo 2: What is my name?",
        "And?",
    ]
    assert len(await stored(app, await by_key(app, "ada"))) == 6


async def test_system_message_sets_the_session_prompt(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await reply(client, "s", {"role": "system", "content": "You are terse."}, user("hi"))
    assert scripted.calls[-1].messages[0] == ChatMessage("system", "You are terse.")
    assert sent(scripted)[1:] == [("user", "hi")]

    await reply(client, "s", user("and now?"))
    assert sent(scripted) == [
        ("system", "You are terse."),
        ("user", "hi"),
        ("assistant", "Echo 1: hi"),
        ("user", "and now?"),
    ]
    conversation = await by_key(app, "s")
    assert conversation is not None and conversation.system_prompt == "You are terse."
    # The prompt is not a message of the conversation.
    assert [m.role for m in await stored(app, conversation)] == ["user", "assistant"] * 2

    await reply(client, "s", {"role": "system", "content": "Be verbose."}, user("again"))
    assert sent(scripted)[0] == ("system", "Be verbose.")
    assert "You are terse." not in [content for _, content in sent(scripted)]
    await reply(client, "other", user("no prompt here"))
    assert sent(scripted) == [("user", "no prompt here")]


async def test_developer_message_counts_as_system(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await reply(client, "s", {"role": "developer", "content": "Answer in French."}, user("hi"))
    assert sent(scripted) == [("system", "Answer in French."), ("user", "hi")]


async def test_text_content_parts_are_joined(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    parts = [{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]
    text = await reply(client, "s", {"role": "user", "content": parts})
    assert text == "Echo 1: first part\nsecond part"
    assert sent(scripted) == [("user", "first part\nsecond part")]
    assert (await stored(app, await by_key(app, "s")))[0].content == "first part\nsecond part"


# --- commands -------------------------------------------------------------------------


async def test_new_starts_a_fresh_conversation_and_keeps_the_old(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await reply(client, "wx:dm:a", user("remember the word apple"))
    await reply(client, "wx:dm:a", user("and pear"))
    old = await by_key(app, "wx:dm:a")
    calls = len(scripted.calls)

    answer = await reply(client, "wx:dm:a", user("/new"))
    assert answer and not answer.startswith("Echo")
    assert len(scripted.calls) == calls  # a command never reaches the model

    assert await reply(client, "wx:dm:a", user("what word?")) == "Echo 1: what word?"
    assert sent(scripted) == [("user", "what word?")]

    everything = await conversations(app)
    assert len(everything) == 2
    assert old is not None and old.id in {c.id for c in everything}
    kept = await stored(app, old)
    assert [m.content for m in kept] == [
        "remember the word apple",
        "Echo 1: remember the word apple",
        "and pear",
        "Echo 2: and pear",
    ]
    current = await by_key(app, "wx:dm:a")
    assert current is not None and current.id != old.id
    assert [m.content for m in await stored(app, current)] == ["what word?", "Echo 1: what word?"]


async def test_new_when_streaming(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await reply(client, "s", user("before"))
    r = await client.post(
        URL,
        headers=key("s"),
        json={
            "messages": [user(" /new ")],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    payloads = [b.removeprefix("data: ") for b in r.text.split("\n\n") if b.strip()]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "usage" in chunks[-1]
    assert await reply(client, "s", user("after")) == "Echo 1: after"


async def test_help_lists_the_commands(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    text = await reply(client, "s", user("/help"))
    assert "/new" in text and "/help" in text
    assert scripted.calls == []
    # Asking for help does not end the session.
    await reply(client, "s", user("one"))
    assert await reply(client, "s", user("two")) == "Echo 2: two"


# --- concurrency and durability -------------------------------------------------------


async def gather_watching(app: FastAPI, *requests: Any) -> tuple[list[httpx.Response], int]:
    """Run requests together; also return the most turns the engine held at once."""
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(app.state.engine.running))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        responses = list(await asyncio.gather(*requests))
    finally:
        done.set()
        await watcher
    return responses, peak


async def test_concurrent_turns_on_one_session_are_serialized(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    scripted.token_delay = 0.002
    texts = [f"message {i:02d}" for i in range(20)]
    responses, peak = await gather_watching(
        app,
        *(
            client.post(URL, headers=key("busy"), json={"messages": [user(t)]}, timeout=60)
            for t in texts
        ),
    )
    assert peak > 1  # the requests really overlapped
    assert [r.status_code for r in responses] == [200] * 20
    answers = {
        t: r.json()["choices"][0]["message"]["content"]
        for t, r in zip(texts, responses, strict=True)
    }

    messages = await stored(app, await by_key(app, "busy"))
    assert len(messages) == 40
    assert [m.position for m in messages] == list(range(40))
    assert [m.role for m in messages] == ["user", "assistant"] * 20
    assert sorted(m.content for m in messages[0::2]) == texts
    for turn, (question, answer) in enumerate(zip(messages[0::2], messages[1::2], strict=True)):
        # Each turn saw every earlier turn whole, and its reply follows its own question.
        assert answer.content == f"Echo {turn + 1}: {question.content}"
        assert answers[question.content] == answer.content
        assert answer.finish_reason == "stop"
    assert len(await conversations(app)) == 1


async def test_concurrent_turns_on_many_sessions(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    scripted.token_delay = 0.002
    sessions = [f"wx:dm:user_{i}" for i in range(20)]
    responses, peak = await gather_watching(
        app,
        *(
            client.post(URL, headers=key(s), json={"messages": [user(f"hi from {s}")]}, timeout=60)
            for s in sessions
        ),
    )
    assert peak > 1
    assert [r.status_code for r in responses] == [200] * 20
    for s, r in zip(sessions, responses, strict=True):
        assert r.json()["choices"][0]["message"]["content"] == f"Echo 1: hi from {s}"
    for s in sessions:
        assert [m.content for m in await stored(app, await by_key(app, s))] == [
            f"hi from {s}",
            f"Echo 1: hi from {s}",
        ]


# --- a history longer than the context window ----------------------------------------


@pytest.fixture
async def small_app(settings: Settings, tmp_path: Path) -> AsyncIterator[FastAPI]:
    """An app whose scripted model has a 64-token context."""
    config = tmp_path / "small.toml"
    config.write_text(
        '[[models]]\nname = "scripted"\nbackend = "scripted"\ncontext_length = 64\n',
        encoding="utf-8",
    )
    application = create_app(dataclasses.replace(settings, config=config, model="scripted"))
    async with application.router.lifespan_context(application):
        await application.state.models.wait_loaded()
        yield application


async def test_long_history_keeps_the_newest_turns(small_app: FastAPI) -> None:
    backend = small_app.state.models.default.backend
    assert isinstance(backend, ScriptedBackend) and backend.context_length == 64
    transport = httpx.ASGITransport(app=small_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for turn in range(1, 16):
            answer = await reply(client, "long", user(f"note {turn}"))
            users = sum(m.role == "user" for m in backend.calls[-1].messages)
            assert answer == f"Echo {users}: note {turn}"

    messages = await stored(small_app, await by_key(small_app, "long"))
    assert len(messages) == 30  # nothing was deleted to make room
    assert messages[0].content == "note 1"

    seen = [(m.role, m.content) for m in backend.calls[-1].messages]
    assert seen[-1] == ("user", "note 15")
    history = seen[:-1]
    before = [(m.role, m.content) for m in messages[:28]]
    # The newest whole messages, in order, ending with the previous turn.
    assert 2 <= len(history) < len(before)
    assert history == before[len(before) - len(history) :]
    assert ("user", "note 1") not in seen
    assert ("user", "note 14") in seen and ("assistant", "Echo 1: note 1") not in seen
    # Within the window (64 tokens minus the 32 kept for the reply), and as full as whole
    # messages allow: the next older one would not have fit.
    assert backend.prompt_tokens(backend.calls[-1].messages) <= 32
    older = messages[len(before) - len(history) - 1]
    wider = [ChatMessage(older.role, older.content), *backend.calls[-1].messages]  # type: ignore[arg-type]
    assert backend.prompt_tokens(wider) > 32
