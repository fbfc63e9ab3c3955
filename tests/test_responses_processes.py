"""Responses with real server processes: a dropped stream resumes from the event log, on
SQLite in one process and on PostgreSQL from another process while the first generates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai

from .conftest import ServerProcess, start_server
from .test_multiprocess import _slow_scripted, postgres_url  # noqa: F401 - a fixture

LONG = " ".join(f"w{i}" for i in range(60))


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _server(tmp_path: Path, name: str, delay: float, env: dict[str, str]) -> ServerProcess:
    config = str(_slow_scripted(tmp_path, delay))
    return start_server(tmp_path / name, "--config", config, "--model", "scripted", env=env)


def _start_and_drop(client: openai.OpenAI, text: str, count: int) -> tuple[str, list[Any]]:
    """Start a background stream, read `count` events, drop the connection."""
    stream = client.responses.create(input=text, stream=True, background=True)
    seen: list[Any] = []
    for event in stream:
        seen.append(event)
        if len(seen) == count:
            break
    stream.close()
    return seen[0].response.id, seen


def _check_rest(seen: list[Any], rest: list[Any], text: str) -> None:
    numbers = [e.sequence_number for e in seen + rest]
    assert numbers == list(range(len(numbers)))
    deltas = [e.delta for e in seen + rest if e.type == "response.output_text.delta"]
    assert rest[-1].type == "response.completed"
    assert rest[-1].response.output_text == text
    # the echo of the scripted model: the user text after "Echo 1: "
    assert "".join(deltas) == text


def test_resume_a_dropped_stream(tmp_path: Path) -> None:
    server = _server(tmp_path, "one", 0.01, {})
    try:
        client = _client(server)
        rid, seen = _start_and_drop(client, LONG, 6)
        rest = list(client.responses.retrieve(rid, stream=True, starting_after=5))
        _check_rest(seen, rest, f"Echo 1: {LONG}")
        # a plain (not background) stream stops when its client goes away
        stream = client.responses.create(input=LONG, stream=True)
        first: Any = next(iter(stream))
        stream.close()
        stopped = client.responses.retrieve(first.response.id)
        for _ in range(500):
            if stopped.status != "in_progress":
                break
            stopped = client.responses.retrieve(first.response.id)
        assert stopped.status == "cancelled"
    finally:
        server.stop()


def test_two_processes_share_chains_and_streams(
    tmp_path: Path,
    postgres_url: str,  # noqa: F811 - the fixture
) -> None:
    env = {"PARLOUR_DATABASE_URL": postgres_url}
    a = _server(tmp_path, "a", 0.02, env)
    b = _server(tmp_path, "b", 0.02, env)
    try:
        on_a, on_b = _client(a), _client(b)
        first = on_a.responses.create(input="first")
        second = on_b.responses.create(input="second", previous_response_id=first.id)
        assert second.output_text == "Echo 2: second"
        assert on_a.responses.retrieve(second.id).output_text == "Echo 2: second"

        rid, seen = _start_and_drop(on_a, LONG, 6)
        rest = list(on_b.responses.retrieve(rid, stream=True, starting_after=5))
        _check_rest(seen, rest, f"Echo 1: {LONG}")

        running = on_a.responses.create(input=LONG, background=True)
        for event in on_b.responses.retrieve(running.id, stream=True):
            if event.type == "response.output_text.delta":
                break
        cancelled = on_b.responses.cancel(running.id)
        assert cancelled.status == "cancelled"
        assert 0 < len(cancelled.output_text) < len(f"Echo 1: {LONG}")
    finally:
        a.stop()
        b.stop()
