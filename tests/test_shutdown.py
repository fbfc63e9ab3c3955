"""SIGTERM with a stream open: the client gets the dialect's error event and end marker, the
partial reply is stored as `cancelled`, and the server exits 0."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ServerProcess

LONG = " ".join(f"word{i}" for i in range(200))


@dataclass(frozen=True)
class Dialect:
    """How to open a stream in one dialect and what its error event looks like."""

    prepare: Callable[[httpx.Client], tuple[str, dict[str, Any]]]
    error_of: Callable[[Any], str]
    end: Callable[[str], bool]
    persisted: bool


def _conversations(client: httpx.Client) -> tuple[str, dict[str, Any]]:
    created = client.post("/conversations", json={"title": "t", "model_tag": "scripted"})
    assert created.status_code == 201, created.text
    return f"/conversations/{created.json()['id']}/messages", {"message": {"content": LONG}}


def _openai(_client: httpx.Client) -> tuple[str, dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": LONG}], "stream": True}
    return "/v1/chat/completions", body


def _kernel2(_client: httpx.Client) -> tuple[str, dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": LONG}], "stream": True}
    return "/api/kernel2/chat", body


def _bots(client: httpx.Client) -> tuple[str, dict[str, Any]]:
    bot = {"slug": "b", "name": "B", "system_prompt": "You help."}
    assert client.post("/admin/bots", json=bot).status_code == 201
    return "/chat", {"bot_slug": "b", "prompt": LONG, "stream": True}


def _done_marker(line: str) -> bool:
    return line == "data: [DONE]"


DIALECTS = {
    "conversations": Dialect(
        _conversations,
        lambda event: event["error"]["message"],
        lambda line: line.startswith("data: ") and json.loads(line[6:]).get("done") is True,
        persisted=True,
    ),
    "openai": Dialect(
        _openai, lambda event: event["error"]["message"], _done_marker, persisted=True
    ),
    "kernel2": Dialect(_kernel2, lambda event: event["message"], _done_marker, persisted=False),
    "bots": Dialect(_bots, lambda event: event["detail"], _done_marker, persisted=False),
}


@pytest.fixture
def slow_server(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> Iterator[ServerProcess]:
    """A server whose scripted model writes one word every 50 ms."""
    config = tmp_path / "slow.toml"
    config.write_text('[[models]]\nname = "scripted"\nbackend = "scripted"\ntoken_delay = 0.05\n')
    yield server_factory("--config", str(config), "--model", "scripted")


@pytest.mark.parametrize("name", list(DIALECTS))
def test_sigterm_ends_open_streams_in_their_dialect(slow_server: ServerProcess, name: str) -> None:
    dialect = DIALECTS[name]
    headers = {"x-session-key": "shutdown"}
    with httpx.Client(base_url=slow_server.url, timeout=60, headers=headers) as client:
        path, body = dialect.prepare(client)
        with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen: list[str] = []
            for line in lines:
                seen.append(line)
                if sum(1 for s in seen if s.startswith("data: ")) >= 4:
                    break
            slow_server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line and not line.startswith(":")]
    assert slow_server.process.wait(timeout=30) == 0, slow_server.log.read_text()
    assert len(rest) >= 2, rest
    *_, error_line, end_line = rest
    assert dialect.end(end_line), rest
    assert "shutting down" in dialect.error_of(json.loads(error_line.removeprefix("data: ")))
    log = slow_server.log.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log
    if dialect.persisted:
        rows = slow_server.rows(
            "SELECT role, content, finish_reason FROM messages ORDER BY created_at, position"
        )
        assert [r["role"] for r in rows] == ["user", "assistant"]
        reply = rows[1]
        assert reply["finish_reason"] == "cancelled"
        assert reply["content"].startswith("Echo 1: word0")
        assert len(reply["content"]) < len(LONG)
