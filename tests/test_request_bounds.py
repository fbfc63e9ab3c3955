"""Every route has a body limit, messages have a length cap, long text is tokenised off the
event loop, and the scripted backend's record of calls stays bounded."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from parlour.backends.base import ChatMessage, GenerationParams
from parlour.backends.scripted import ScriptedBackend
from parlour.bounds import OFF_LOOP_CHARS
from parlour.settings import Settings
from tests.conftest import running_app
from tests.support.dialects import make_bot

LIMIT = 20_000
CAP = 5_000


@pytest.fixture
async def limited(settings: Settings) -> AsyncIterator[FastAPI]:
    """An app with small body, upload and message limits."""
    changed = dataclasses.replace(
        settings, max_body_bytes=LIMIT, max_upload_bytes=2 * LIMIT, max_message_chars=CAP
    )
    async with running_app(changed) as application:
        yield application


@pytest.fixture
def app(limited: FastAPI) -> FastAPI:
    """The limited app is the one conftest's `client` talks to."""
    return limited


async def _messages(client: httpx.AsyncClient, conversation: str) -> list[Any]:
    listed = await client.get(f"/conversations/{conversation}/messages")
    assert listed.status_code == 200
    result: list[Any] = listed.json()
    return result


async def _conversation(client: httpx.AsyncClient) -> str:
    created = await client.post("/conversations", json={"title": "t", "model_tag": "scripted"})
    assert created.status_code == 201
    return str(created.json()["id"])


async def test_body_limit_applies_to_the_conversations_api(client: httpx.AsyncClient) -> None:
    conversation = await _conversation(client)
    big = {"message": {"content": "word " * LIMIT}, "stream": False}
    response = await client.post(f"/conversations/{conversation}/messages", json=big)
    assert response.status_code == 413
    assert "PARLOUR_MAX_BODY_BYTES" in response.json()["detail"]
    assert await _messages(client, conversation) == []


async def test_body_limit_holds_without_a_declared_length(client: httpx.AsyncClient) -> None:
    conversation = await _conversation(client)

    async def chunks(*parts: bytes, filler: int = 0) -> AsyncIterator[bytes]:
        yield parts[0]
        for _ in range(filler):
            yield b"x" * 1000
        for part in parts[1:]:
            yield part

    response = await client.post(
        f"/conversations/{conversation}/messages",
        content=chunks(b'{"message": {"content": "', b'"}, "stream": false}', filler=LIMIT // 1000),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert await _messages(client, conversation) == []
    small = await client.post(
        f"/conversations/{conversation}/messages",
        content=chunks(b'{"message": {"content": "hi"}, ', b'"stream": false}'),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200, small.text


async def test_uploads_have_their_own_limit(client: httpx.AsyncClient) -> None:
    assert (await client.post("/admin/kbs", json={"name": "kb"})).status_code == 201
    fits = [("file", ("a.md", b"# A\n\n" + b"text " * (LIMIT // 4), "text/markdown"))]
    assert (await client.post("/admin/kbs/kb/documents", files=fits)).status_code == 200
    over = [("file", ("b.md", b"text " * LIMIT, "text/markdown"))]
    refused = await client.post("/admin/kbs/kb/documents", files=over)
    assert refused.status_code == 413 and "PARLOUR_MAX_UPLOAD_BYTES" in refused.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "message_of"),
    [
        (
            "/v1/chat/completions",
            lambda text: {"messages": [{"role": "user", "content": text}]},
            lambda body: body["error"]["code"],
        ),
        (
            "/api/kernel2/chat",
            lambda text: {"messages": [{"role": "user", "content": text}]},
            lambda body: body["message"],
        ),
        (
            "/chat",
            lambda text: {"bot_slug": "taxson", "prompt": text, "stream": False},
            lambda body: body["detail"],
        ),
    ],
)
async def test_messages_are_capped_in_every_dialect(
    client: httpx.AsyncClient,
    scripted_app: FastAPI,
    path: str,
    body: Callable[[str], Any],
    message_of: Callable[[Any], str],
) -> None:
    await make_bot(client)
    response = await client.post(path, json=body("x" * (CAP + 1)), headers={"x-session-key": "k"})
    assert response.status_code == 400, response.text
    shown = message_of(response.json())
    assert shown == "message_too_long" or "PARLOUR_MAX_MESSAGE_CHARS" in shown
    assert scripted_app.state.models.default.backend.calls == []
    fits = await client.post(path, json=body("x" * CAP), headers={"x-session-key": "k"})
    assert fits.status_code == 200, fits.text


async def test_conversation_messages_are_capped(client: httpx.AsyncClient) -> None:
    conversation = await _conversation(client)
    response = await client.post(
        f"/conversations/{conversation}/messages",
        json={"message": {"content": "x" * (CAP + 1)}, "stream": False},
    )
    assert response.status_code == 400
    assert "PARLOUR_MAX_MESSAGE_CHARS" in response.json()["detail"]
    assert await _messages(client, conversation) == []


@pytest.fixture
def scripted_app(limited: FastAPI) -> FastAPI:
    return limited


async def test_long_messages_are_tokenised_off_the_event_loop(
    client: httpx.AsyncClient, limited: FastAPI
) -> None:
    backend = limited.state.models.default.backend
    assert isinstance(backend, ScriptedBackend)
    loop_thread = threading.get_ident()
    counted: list[tuple[int, bool]] = []
    count_tokens = backend.count_tokens

    def spy(text: str) -> int:
        counted.append((len(text), threading.get_ident() != loop_thread))
        return count_tokens(text)

    backend.count_tokens = spy  # type: ignore[method-assign]
    backend.enqueue("ok", "ok")  # replies are bounded by max_tokens; the message is not
    conversation = await _conversation(client)
    long_text = "word " * (OFF_LOOP_CHARS // 5 + 10)
    runs: list[list[tuple[int, bool]]] = []
    for text in ("short", long_text[: CAP - 1]):
        response = await client.post(
            f"/conversations/{conversation}/messages",
            json={"message": {"content": text}, "stream": False},
        )
        assert response.status_code == 200, response.text
        runs.append(list(counted))
        counted.clear()
    short, long = runs
    # Short text is counted in place (a thread costs more than it saves)...
    assert short and not any(off for _size, off in short)
    # ...and long text never on the event loop.
    assert [off for size, off in long if size >= OFF_LOOP_CHARS] == [True] * len(
        [size for size, _off in long if size >= OFF_LOOP_CHARS]
    )
    assert any(size >= OFF_LOOP_CHARS for size, _off in long)


async def test_scripted_backend_keeps_a_bounded_record() -> None:
    backend = ScriptedBackend(calls_kept=8)
    params = GenerationParams(max_tokens=4)
    for index in range(50):
        async for _ in backend.stream([ChatMessage("user", f"m{index}")], params):
            pass
    assert len(backend.calls) == 8
    assert backend.calls[-1].messages[0].content == "m49"
    assert backend.calls[0].messages[0].content == "m42"
