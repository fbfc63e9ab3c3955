"""A session whose history outgrows a small context window, with the real model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.model

CONTEXT = 512
MAX_TOKENS = 32
TURNS = 6
CONFIG = f"""
[[models]]
name = "small"
backend = "llama"
context_length = {CONTEXT}
max_tokens = {MAX_TOKENS}
"""

NOTE = (
    "Please remember this note about the garden: the roses by the north wall need water "
    "every morning, the tomatoes in the greenhouse are ripe and should be picked this week, "
    "the old apple tree should be pruned before the first frost arrives, the compost heap "
    "behind the shed needs turning, the hedge along the lane has grown over the path, and "
    "the bench under the pear tree wants a fresh coat of green paint before the summer party."
)


@pytest.fixture
def small_server(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    """A server whose default model is the embedded one with a 512-token window."""
    config = tmp_path / "parlour.toml"
    config.write_text(CONFIG, encoding="utf-8")
    return server_factory("--config", str(config), "--model", "small")


def chat(server: ServerProcess, session_key: str, content: str) -> httpx.Response:
    """One non-streamed turn with the model's configured reply length."""
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"x-session-key": session_key},
        json={"messages": [{"role": "user", "content": content}], "temperature": 0},
        timeout=120,
    )


def token_counts(server: ServerProcess, session_key: str) -> list[int]:
    """The stored token counts of a session's messages, oldest first."""
    rows = server.rows(
        "SELECT m.token_count FROM messages m JOIN conversations c ON c.id = m.conversation_id "
        "WHERE c.session_key = ? ORDER BY m.position",
        session_key,
    )
    return [int(row["token_count"]) for row in rows]


def test_history_beyond_the_window_is_trimmed_not_lost(small_server: ServerProcess) -> None:
    key = "long:history"
    prompts: list[int] = []
    sent: list[str] = []
    trimmed = 0
    for turn in range(TURNS):
        content = f"Note {turn + 1}. {NOTE}"
        response = chat(small_server, key, content)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "small"
        assert body["choices"][0]["message"]["content"].strip()
        usage = body["usage"]
        assert 0 < usage["completion_tokens"] <= MAX_TOKENS
        assert usage["prompt_tokens"] + MAX_TOKENS <= CONTEXT
        prompts.append(usage["prompt_tokens"])
        sent.append(content)

        *seen_before, _reply = token_counts(small_server, key)
        if sum(seen_before) > CONTEXT - MAX_TOKENS:
            # The messages alone, without any template, could not have fit: older
            # ones were left out, and the newest exchange plus the question were kept.
            trimmed += 1
            assert usage["prompt_tokens"] < sum(seen_before)
            assert usage["prompt_tokens"] > sum(seen_before[-3:])
    assert trimmed >= 2, prompts

    stored = small_server.rows(
        "SELECT m.role, m.content, m.finish_reason FROM messages m "
        "JOIN conversations c ON c.id = m.conversation_id "
        "WHERE c.session_key = ? ORDER BY m.position",
        key,
    )
    assert [row["role"] for row in stored] == ["user", "assistant"] * TURNS
    assert [row["content"] for row in stored if row["role"] == "user"] == sent
    assert all(
        row["finish_reason"] in ("stop", "length") for row in stored if row["role"] == "assistant"
    )


def test_new_message_alone_too_long_is_400(small_server: ServerProcess) -> None:
    response = chat(small_server, "long:huge", "garden " * CONTEXT)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
    assert str(CONTEXT) in error["message"]
    stored = small_server.rows(
        "SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
        "WHERE c.session_key = ?",
        "long:huge",
    )
    assert stored == []

    # The session is still usable with a message that fits.
    assert chat(small_server, "long:huge", "Hello!").status_code == 200
