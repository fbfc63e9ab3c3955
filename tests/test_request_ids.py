"""Request ids: echoed or made up, carried by every log line of their request; JSON logs
that name the request and its owner and never a secret or a message's text."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from parlour.auth import KEY_PREFIX, create_key
from parlour.backends.base import ChatMessage, Chunk, GenerationParams
from parlour.backends.scripted import ScriptedBackend
from parlour.ops.logs import JsonFormatter, RequestContextFilter
from parlour.store import queries

from .conftest import ServerProcess

URL = "/v1/chat/completions"
SECRET_TEXT = "my very private message about the garden"


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged at INFO and above while the test runs, as JSON lines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


async def test_a_sane_client_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models", headers={"x-request-id": "abc-123.def:4"})
    assert response.headers["x-request-id"] == "abc-123.def:4"


@pytest.mark.parametrize("sent", [None, "has spaces", "x" * 200, 'quote"d', ""])
async def test_other_requests_get_a_new_id(client: httpx.AsyncClient, sent: str | None) -> None:
    headers = {"x-request-id": sent} if sent is not None else {}
    first = await client.get("/v1/models", headers=headers)
    second = await client.get("/v1/models", headers=headers)
    for response in (first, second):
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_errors_and_auth_refusals_carry_the_id(app: FastAPI) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        missing = await client.get("/nowhere", headers={"x-request-id": "r-404"})
        await create_key(app.state.db, owner="someone")
        refused = await client.post(URL, json=ask("hi"), headers={"x-request-id": "r-401"})
    assert (refused.status_code, refused.headers["x-request-id"]) == (401, "r-401")
    assert (missing.status_code, missing.headers["x-request-id"]) == (404, "r-404")


async def test_json_log_names_the_request_and_owner_but_no_secret(
    app: FastAPI, json_log: io.StringIO
) -> None:
    key = await create_key(app.state.db, owner="gardener")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        response = await client.post(
            URL,
            json=ask(SECRET_TEXT),
            headers={
                "authorization": f"Bearer {key.secret}",
                "x-session-key": "garden",
                "x-request-id": "req-garden-1",
            },
        )
    assert response.status_code == 200, response.text
    text = json_log.getvalue()
    assert key.secret not in text
    # The key's random part (after its prefix and id); it may itself contain "_".
    random_part = key.secret.removeprefix(KEY_PREFIX).partition("_")[2]
    assert len(random_part) >= 40 and random_part not in text
    assert SECRET_TEXT not in text
    access = [
        line
        for line in lines(json_log)
        if line["logger"] == "parlour.access" and line.get("request_id") == "req-garden-1"
    ]
    assert len(access) == 1
    entry = access[0]
    assert entry["status"] == 200
    assert entry["route"] == URL
    assert entry["path"] == URL
    assert isinstance(entry["latency_ms"], float)
    assert {"time", "level", "message"} <= set(entry)
    async with app.state.db.read() as session, session.begin():
        owner = await queries.ensure_owner(session, "gardener")
    assert entry["owner_id"] == str(owner.id)


class FailingBackend(ScriptedBackend):
    """Fails inside the generation task, which logs the failure."""

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        session: str | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        raise RuntimeError("the backend broke")
        yield Chunk()  # pragma: no cover - makes this a generator


async def test_log_lines_inside_the_generation_carry_the_id(
    app: FastAPI, client: httpx.AsyncClient, json_log: io.StringIO
) -> None:
    failing = FailingBackend()
    app.state.models.default.backend = failing
    response = await client.post(
        URL, json=ask(SECRET_TEXT), headers={"x-session-key": "s", "x-request-id": "req-fail"}
    )
    assert response.status_code == 500
    failures = [line for line in lines(json_log) if line["message"] == "generation failed"]
    assert failures, json_log.getvalue()
    assert {line.get("request_id") for line in failures} == {"req-fail"}
    assert "the backend broke" in failures[0]["exception"]
    assert SECRET_TEXT not in json_log.getvalue()


def test_a_server_writes_json_lines(
    server_factory: Any,
) -> None:
    server: ServerProcess = server_factory(
        "--model", "scripted", "--log-format", "json", "--log-level", "info"
    )
    response = httpx.post(
        f"{server.url}{URL}",
        json=ask(SECRET_TEXT),
        headers={"x-session-key": "k", "x-request-id": "proc-req-7"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "proc-req-7"
    server.stop()
    raw = Path(server.log).read_text().splitlines()
    entries = [json.loads(line) for line in raw if line.startswith("{")]
    assert len(entries) == len([line for line in raw if line.strip()]), raw
    mine = [e for e in entries if e.get("request_id") == "proc-req-7"]
    assert [e["logger"] for e in mine] == ["parlour.access"]
    assert mine[0]["status"] == 200 and mine[0]["route"] == URL
    assert SECRET_TEXT not in "\n".join(raw)
