"""A streaming client that disconnects mid-reply: generation stops and the partial reply is kept."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.model

STORY = "Write a very long story about a dragon who learns to bake bread."
MAX_TOKENS = 400


def messages_of(server: ServerProcess, session_key: str) -> list[dict[str, Any]]:
    """The persisted messages of a session's conversation, oldest first."""
    rows = server.rows(
        "SELECT m.role, m.content, m.token_count, m.finish_reason FROM messages m "
        "JOIN conversations c ON c.id = m.conversation_id "
        "WHERE c.session_key = ? ORDER BY m.position",
        session_key,
    )
    return [dict(row) for row in rows]


def wait_for_assistant(server: ServerProcess, session_key: str) -> list[dict[str, Any]]:
    """Poll the database until the session's last message is the assistant's (bounded)."""
    deadline = time.monotonic() + 15
    found = messages_of(server, session_key)
    while time.monotonic() < deadline:
        if found and found[-1]["role"] == "assistant":
            return found
        time.sleep(0.1)
        found = messages_of(server, session_key)
    raise AssertionError(f"no assistant message persisted for {session_key!r}: {found}")


def story(*, stream: bool) -> dict[str, Any]:
    """A chat completion body asking for a long story at temperature 0."""
    return {
        "messages": [{"role": "user", "content": STORY}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


def test_disconnect_after_first_chunk_keeps_partial_reply(model_server: ServerProcess) -> None:
    # Control: undisturbed, the model fills the whole budget with this prompt, so a
    # short cancelled reply below can only come from the disconnect.
    full = httpx.post(
        f"{model_server.url}/v1/chat/completions",
        headers={"x-session-key": "cancel:control"},
        json=story(stream=False),
        timeout=300,
    )
    assert full.status_code == 200, full.text
    assert full.json()["usage"]["completion_tokens"] == MAX_TOKENS
    assert full.json()["choices"][0]["finish_reason"] == "length"

    first_content = None
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{model_server.url}/v1/chat/completions",
            headers={"x-session-key": "cancel:story"},
            json=story(stream=True),
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            delta = json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
            if delta.get("content"):
                first_content = delta["content"]
                break
        # Leaving both blocks closes the socket with the reply still being written.
    assert first_content

    stored = wait_for_assistant(model_server, "cancel:story")
    assert [m["role"] for m in stored] == ["user", "assistant"]
    user, assistant = stored
    assert user["content"] == STORY
    assert user["finish_reason"] is None
    assert user["token_count"] > 0
    assert assistant["finish_reason"] == "cancelled"
    reply = assistant["content"]
    assert reply.startswith(first_content)
    # The undisturbed reply starts the same way (temperature 0): the kept text is a real prefix.
    assert full.json()["choices"][0]["message"]["content"].startswith(reply)
    assert 0 < assistant["token_count"] < MAX_TOKENS // 4, reply


def test_session_continues_after_a_cancelled_turn(model_server: ServerProcess) -> None:
    key = "cancel:continue"
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{model_server.url}/v1/chat/completions",
            headers={"x-session-key": key},
            json=story(stream=True),
        ) as response,
    ):
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break
    wait_for_assistant(model_server, key)

    follow = httpx.post(
        f"{model_server.url}/v1/chat/completions",
        headers={"x-session-key": key},
        json={
            "messages": [{"role": "user", "content": "Give it a title."}],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=120,
    )
    assert follow.status_code == 200, follow.text
    stored = messages_of(model_server, key)
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert [m["finish_reason"] for m in stored][:3] == [None, "cancelled", None]
    assert stored[3]["finish_reason"] in ("stop", "length")
    # The cancelled partial reply is part of what the model saw on the next turn.
    seen = follow.json()["usage"]["prompt_tokens"]
    assert seen > sum(m["token_count"] for m in stored[:3])
