"""Second Me's POST /api/kernel2/chat through the in-process app and the scripted backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from parlour.app import create_app
from parlour.backends.scripted import ScriptedBackend
from parlour.settings import Settings
from tests.support.dialects import events, make_bot, make_kb
from tests.support.kb_documents import ANSWER, QUESTION

CHAT = "/api/kernel2/chat"
REFERENCE = "Reference knowledge:"


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    """The suite's settings with a short heartbeat interval."""
    return Settings(
        data_dir=tmp_path / "data",
        model="scripted",
        database_url=database_url,
        heartbeat_seconds=0.05,
    )


def ask(text: str = "Hello, who are you?", **extra: Any) -> dict[str, Any]:
    """A kernel2 body with a system message and one user message."""
    return {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
        **extra,
    }


def system_of(scripted: ScriptedBackend) -> str:
    """The system prompt of the backend's last call ('' if there was none)."""
    messages = scripted.calls[-1].messages
    return messages[0].content if messages[0].role == "system" else ""


async def test_streams_chunks_until_done_by_default(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    response = await client.post(CHAT, json=ask(), headers={"Accept": "text/event-stream"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks, _ = events(response.text)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Echo 1: Hello, who are you?"
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "system_fingerprint", "choices"}
        assert c["object"] == "chat.completion.chunk" and c["model"] == "scripted"
        assert c["id"] == chunks[0]["id"] and c["system_fingerprint"].startswith("fp_")
        assert c["choices"][0]["index"] == 0
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    call = scripted.calls[-1]
    assert call.params.temperature == 0.1 and call.params.max_tokens == 2000
    assert [m.role for m in call.messages] == ["system", "user"]
    assert call.messages[0].content == "You are a helpful assistant."


async def test_non_streaming_returns_a_completion(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    body = ask(stream=False, temperature=0.7, max_tokens=50, model="gpt-3.5-turbo")
    body["messages"] += [
        {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "What can you do for me?"},
    ]
    response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "scripted"  # the model that served, not the one asked
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Echo 2: What can you do for me?",
    }
    call = scripted.calls[-1]
    assert completion["usage"]["prompt_tokens"] == scripted.prompt_tokens(call.messages)
    assert completion["usage"]["completion_tokens"] == 8  # one per word
    assert call.params.temperature == 0.7 and call.params.max_tokens == 50
    assert [m.role for m in call.messages] == ["system", "user", "assistant", "user"]


async def test_heartbeat_while_no_token_is_sent(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    scripted.token_delay = 0.3
    scripted.enqueue("slow reply")
    response = await client.post(CHAT, json=ask())
    chunks, comments = events(response.text)
    assert comments and set(comments) == {": heartbeat"}
    first_heartbeat = response.text.index(": heartbeat")
    assert first_heartbeat < response.text.index('"content":"slow"')
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "slow reply"


async def test_l0_retrieval_adds_the_best_chunk(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await make_kb(client, "default")
    on = ask(QUESTION, stream=False, metadata={"enable_l0_retrieval": True})
    assert (await client.post(CHAT, json=on)).status_code == 200
    system = system_of(scripted)
    assert system.startswith("You are a helpful assistant.")
    assert REFERENCE in system
    reference = system.split(REFERENCE, 1)[1]
    first = reference.split("\n\n[2]")[0]
    assert first.startswith("\n\n[1] (texas-taxes.md)") and ANSWER in first

    off = ask(QUESTION, stream=False, metadata={"enable_l0_retrieval": False})
    assert (await client.post(CHAT, json=off)).status_code == 200
    assert REFERENCE not in system_of(scripted) and ANSWER not in system_of(scripted)
    assert (await client.post(CHAT, json=ask(QUESTION, stream=False))).status_code == 200
    assert REFERENCE not in system_of(scripted)

    # Nothing relevant: nothing is added.
    unrelated = ask("Hello there!", stream=False, metadata={"enable_l0_retrieval": True})
    assert (await client.post(CHAT, json=unrelated)).status_code == 200
    assert REFERENCE not in system_of(scripted)


async def test_role_overrides_system_prompt_and_l0_flag(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await make_kb(client, "handbook")
    quiet = await make_bot(client, kb="handbook", enable_l0_retrieval=False)
    metadata = {"enable_l0_retrieval": True, "role_id": quiet["uid"]}
    response = await client.post(CHAT, json=ask(QUESTION, stream=False, metadata=metadata))
    assert response.status_code == 200, response.text
    assert system_of(scripted) == "You explain taxes."  # replaces the request's
    assert REFERENCE not in system_of(scripted)

    eager = await make_bot(
        client, slug="eager", kb="handbook", temperature=0.4, max_tokens=64, model="nope"
    )
    metadata = {"enable_l0_retrieval": False, "role_id": eager["uid"]}
    response = await client.post(CHAT, json=ask(QUESTION, stream=False, metadata=metadata))
    assert response.status_code == 200, response.text
    system = system_of(scripted)
    assert system.startswith("You explain taxes.\n\nReference knowledge:")
    assert ANSWER in system
    assert scripted.calls[-1].params.temperature == 0.4
    assert scripted.calls[-1].params.max_tokens == 64


async def test_unknown_role_is_404(client: httpx.AsyncClient) -> None:
    metadata = {"role_id": "5b7f7c4e-4c52-4a7e-9d0e-000000000000"}
    response = await client.post(CHAT, json=ask(metadata=metadata))
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"success", "message", "code"}
    assert body["success"] is False and body["code"] == 404 and "Role" in body["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"{}", "messages"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": "hi"}', "messages"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "system", "content": "x"}]}', "no user message"),
    ],
)
async def test_bad_requests_are_400_in_second_me_shape(
    client: httpx.AsyncClient, body: bytes, needle: str
) -> None:
    response = await client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["success"] is False and error["code"] == 400
    assert needle in error["message"], error["message"]


async def test_every_wrong_type_is_named_at_once(client: httpx.AsyncClient) -> None:
    body = ask(stream="yes", temperature="hot", max_tokens=0, metadata={"role_id": 5})
    response = await client.post(CHAT, json=body)
    assert response.status_code == 400
    message = response.json()["message"]
    for name in ("stream", "temperature", "max_tokens", "metadata.role_id"):
        assert name in message, message


@pytest.fixture
async def small_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    """An app whose scripted model has a 256-token window."""
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nname = "tiny"\nbackend = "scripted"\ncontext_length = 256\n')
    application = create_app(Settings(data_dir=tmp_path / "small", model="tiny", config=config))
    async with application.router.lifespan_context(application):
        await application.state.models.wait_loaded()
        yield application


async def test_max_tokens_is_capped_to_what_fits(small_app: FastAPI) -> None:
    scripted = small_app.state.models.default.backend
    assert isinstance(scripted, ScriptedBackend)
    transport = httpx.ASGITransport(app=small_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        history = [{"role": "user", "content": f"old message {i} " * 20} for i in range(20)]
        messages = [*history, {"role": "user", "content": "new"}]
        body = {"messages": messages, "stream": False}
        response = await client.post(CHAT, json=body)
        assert response.status_code == 200, response.text
        call = scripted.calls[-1]
        prompt = scripted.prompt_tokens(call.messages)
        assert call.params.max_tokens == 256 - prompt  # not the default 2000
        assert prompt <= 256 // 2 and call.messages[-1].content == "new"
        assert len(call.messages) < len(messages)  # oldest messages dropped

        huge = {"messages": [{"role": "user", "content": "word " * 300}]}
        response = await client.post(CHAT, json=huge)
        assert response.status_code == 400
        assert "maximum context length" in response.json()["message"]


async def test_model_not_ready_is_503(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"  # fails to load, so the model never becomes ready
    application = create_app(Settings(data_dir=tmp_path / "d", model=str(missing)))
    async with application.router.lifespan_context(application):
        await application.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            response = await client.post(CHAT, json=ask())
    assert response.status_code == 503
    body = response.json()
    assert body["success"] is False and body["code"] == 503 and "missing" in body["message"]
