"""Usage figures: every generation in every dialect is recorded; GET /v1/usage totals them."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from parlour.backends.scripted import ScriptedBackend
from tests.conftest import ServerProcess
from tests.support.dialects import events, make_bot


def call_usage(scripted: ScriptedBackend, index: int, reply: str) -> tuple[int, int]:
    """(prompt, completion) tokens of one scripted call, counted the backend's way."""
    return scripted.prompt_tokens(scripted.calls[index].messages), scripted.count_tokens(reply)


async def test_totals_match_the_responses(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    bot = await make_bot(client)
    seen: dict[tuple[str | None, str | None], list[int]] = {}

    def add(user: str | None, bot_uid: str | None, prompt: int, completion: int) -> None:
        totals = seen.setdefault((user, bot_uid), [0, 0, 0])
        totals[0] += 1
        totals[1] += prompt
        totals[2] += completion

    # OpenAI dialect, with the `user` field, both ways.
    openai = await client.post(
        "/v1/chat/completions",
        headers={"x-session-key": "usage:a"},
        json={"messages": [{"role": "user", "content": "one two"}], "user": "alice"},
    )
    u = openai.json()["usage"]
    add("alice", None, u["prompt_tokens"], u["completion_tokens"])
    streamed = await client.post(
        "/v1/chat/completions",
        headers={"x-session-key": "usage:a"},
        json={
            "messages": [{"role": "user", "content": "three"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks, _ = events(streamed.text)
    u = chunks[-1]["usage"]
    add(None, None, u["prompt_tokens"], u["completion_tokens"])

    # kernel2: usage in the completion; a stream carries none, so count the backend's call.
    k2 = await client.post(
        "/api/kernel2/chat",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": False},
    )
    u = k2.json()["usage"]
    add(None, None, u["prompt_tokens"], u["completion_tokens"])
    k2_role = await client.post(
        "/api/kernel2/chat",
        json={
            "messages": [{"role": "user", "content": "hello"}],
            "metadata": {"role_id": bot["uid"]},
        },
    )
    chunks, _ = events(k2_role.text)
    reply = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    add(None, bot["uid"], *call_usage(scripted, -1, reply))

    # Bot API: {"content"} only, so count the backend's calls.
    for user_id, stream in (("alice", False), (7, True), ("alice", True)):
        response = await client.post(
            "/chat",
            json={"bot_slug": "taxson", "prompt": "pay?", "stream": stream, "user_id": user_id},
        )
        if stream:
            reply = "".join(p["content"] for p in events(response.text)[0])
        else:
            reply = response.json()["content"]
        add(str(user_id), bot["uid"], *call_usage(scripted, -1, reply))

    report = (await client.get("/v1/usage")).json()
    today = datetime.now(UTC).date().isoformat()
    rows = {(r["user_id"], r["bot_uid"]): r for r in report["data"]}
    assert set(rows) == set(seen)
    for key, (requests, prompt, completion) in seen.items():
        row = rows[key]
        assert row["day"] == today
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
            requests,
            prompt,
            completion,
        ), key
        assert row["total_tokens"] == prompt + completion
        assert row["bot_slug"] == ("taxson" if key[1] else None)
    assert report["totals"] == {
        "requests": sum(v[0] for v in seen.values()),
        "prompt_tokens": sum(v[1] for v in seen.values()),
        "completion_tokens": sum(v[2] for v in seen.values()),
        "total_tokens": sum(v[1] + v[2] for v in seen.values()),
    }

    only_alice = (await client.get("/v1/usage", params={"user_id": "alice"})).json()
    assert {r["user_id"] for r in only_alice["data"]} == {"alice"}
    assert only_alice["totals"]["requests"] == 3
    only_bot = (await client.get("/v1/usage", params={"bot": "taxson"})).json()
    assert only_bot["totals"]["requests"] == 4
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    later = (await client.get("/v1/usage", params={"since": tomorrow})).json()
    assert later["data"] == [] and later["totals"]["requests"] == 0
    assert (await client.get("/v1/usage", params={"until": today})).json() == report

    # Deleting the bot keeps its figures.
    assert (await client.delete("/admin/bots/taxson")).status_code == 204
    after = (await client.get("/v1/usage")).json()
    assert after["totals"] == report["totals"]


def test_disconnect_stops_generation_and_records_partial_usage(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    config = tmp_path / "slow.toml"
    config.write_text('[[models]]\nname = "slow"\nbackend = "scripted"\ntoken_delay = 0.05\n')
    server = server_factory("--config", str(config), "--model", "slow")
    long_prompt = " ".join(f"w{i}" for i in range(400))  # echoed back: about 400 tokens
    body: dict[str, Any] = {"messages": [{"role": "user", "content": long_prompt}]}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{server.url}/api/kernel2/chat", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"Echo"' in line:
                break  # leave after the first token
    deadline = time.monotonic() + 15
    rows: list[Any] = []
    while time.monotonic() < deadline and not rows:
        rows = server.rows("SELECT dialect, completion_tokens FROM usage")
        time.sleep(0.1)
    assert [row["dialect"] for row in rows] == ["kernel2"]
    assert 1 <= rows[0]["completion_tokens"] < 100
    assert server.rows("SELECT count(*) AS n FROM messages")[0]["n"] == 0
