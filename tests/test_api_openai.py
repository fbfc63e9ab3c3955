"""The OpenAI dialect's wire protocol: completions, chunks, sampling, models, health, the SDK."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from parlour.app import create_app
from parlour.backends.scripted import ScriptedBackend
from parlour.models import LoadedModel, ModelRegistry, ModelSpec
from parlour.settings import Settings

URL = "/v1/chat/completions"
KEY = {"x-session-key": "wx:dm:user_alice"}


def user(text: str) -> list[dict[str, Any]]:
    """A request's messages holding one user message."""
    return [{"role": "user", "content": text}]


def events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an event stream, JSON-decoded except the `[DONE]` marker."""
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads: list[Any] = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


@asynccontextmanager
async def running(
    settings: Settings, models: ModelRegistry | None = None, *, wait: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app built from these settings with its lifespan running, and a client for it."""
    app = create_app(settings, models=models)
    async with app.router.lifespan_context(app):
        if wait:
            await app.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield app, c


def two_models_config(tmp_path: Path) -> Path:
    """A config with two scripted models, each with aliases."""
    path = tmp_path / "models.toml"
    path.write_text(
        "[[models]]\n"
        'name = "scripted"\nbackend = "scripted"\naliases = ["echo", "tiny"]\n\n'
        "[[models]]\n"
        'name = "other"\nbackend = "scripted"\naliases = ["other-alias"]\n',
        encoding="utf-8",
    )
    return path


# --- non-streamed completions ---------------------------------------------------------


async def test_completion_shape(client: httpx.AsyncClient, scripted: ScriptedBackend) -> None:
    scripted.enqueue("Hi there, I am parlour.")
    r = await client.post(URL, headers=KEY, json={"model": "scripted", "messages": user("Hello")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > len("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["created"] > 1_600_000_000
    assert body["model"] == "scripted"
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "Hi there, I am parlour."}
    assert choice["finish_reason"] == "stop"
    sent = scripted.calls[-1].messages
    assert body["usage"] == {
        "prompt_tokens": scripted.prompt_tokens(sent),
        "completion_tokens": scripted.count_tokens("Hi there, I am parlour."),
        "total_tokens": scripted.prompt_tokens(sent) + 5,
    }
    assert body["usage"]["completion_tokens"] == 5


async def test_usage_counts_grow_with_history(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    first = (await client.post(URL, headers=KEY, json={"messages": user("one two")})).json()
    second = (await client.post(URL, headers=KEY, json={"messages": user("three")})).json()
    # Turn 2 also sees turn 1 (user + reply), so its prompt is strictly longer.
    assert second["usage"]["prompt_tokens"] == scripted.prompt_tokens(scripted.calls[-1].messages)
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]


async def test_ids_are_unique(client: httpx.AsyncClient) -> None:
    ids = {
        (await client.post(URL, headers=KEY, json={"messages": user(f"m{i}")})).json()["id"]
        for i in range(3)
    }
    assert len(ids) == 3


async def test_max_tokens_ends_with_length(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    scripted.enqueue("one two three four five six")
    r = await client.post(URL, headers=KEY, json={"messages": user("count"), "max_tokens": 3})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "one two three"
    assert body["usage"]["completion_tokens"] == 3
    assert scripted.calls[-1].params.max_tokens == 3


async def test_max_completion_tokens_wins_over_max_tokens(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    scripted.enqueue("one two three four five six")
    r = await client.post(
        URL,
        headers=KEY,
        json={"messages": user("count"), "max_tokens": 5, "max_completion_tokens": 2},
    )
    assert r.json()["choices"][0]["message"]["content"] == "one two"
    assert r.json()["choices"][0]["finish_reason"] == "length"


async def test_stop_sequences(client: httpx.AsyncClient, scripted: ScriptedBackend) -> None:
    scripted.enqueue("alpha beta END gamma", "red green blue yellow")
    r = await client.post(URL, headers=KEY, json={"messages": user("go"), "stop": "END"})
    assert r.json()["choices"][0]["message"]["content"] == "alpha beta "
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert scripted.calls[-1].params.stop == ("END",)
    r = await client.post(
        URL, headers=KEY, json={"messages": user("again"), "stop": ["yellow", "blue"]}
    )
    assert r.json()["choices"][0]["message"]["content"] == "red green "
    assert list(scripted.calls[-1].params.stop) == ["yellow", "blue"]


async def test_sampling_parameters_reach_the_backend(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    r = await client.post(
        URL,
        headers=KEY,
        json={
            "messages": user("hi"),
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 42,
            "presence_penalty": 1.5,
            "frequency_penalty": -1,
            "n": 1,
            "user": "alice",
            "some_future_field": {"ignored": True},
        },
    )
    assert r.status_code == 200, r.text
    params = scripted.calls[-1].params
    assert (params.temperature, params.top_p, params.seed) == (0.5, 0.9, 42)
    assert (params.presence_penalty, params.frequency_penalty) == (1.5, -1)


async def test_boundary_values_are_accepted(client: httpx.AsyncClient) -> None:
    for extra in (
        {"temperature": 0, "top_p": 0},
        {"temperature": 2, "top_p": 1},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"stop": ["a", "b", "c", "d"], "max_tokens": 1},
        {"temperature": None, "stream_options": None, "model": None},
    ):
        r = await client.post(URL, headers=KEY, json={"messages": user("hi"), **extra})
        assert r.status_code == 200, (extra, r.text)


# --- streamed completions -------------------------------------------------------------


async def test_stream_chunks(client: httpx.AsyncClient, scripted: ScriptedBackend) -> None:
    scripted.enqueue("Streaming works fine.")
    r = await client.post(URL, headers=KEY, json={"messages": user("Hello"), "stream": True})
    assert r.status_code == 200
    payloads = events(r)
    assert payloads[-1] == "[DONE]"
    chunks: list[dict[str, Any]] = payloads[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["model"] == "scripted" and isinstance(c["created"], int) for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = chunks[1:-1]
    assert len(content) == 3  # one per scripted token: "Streaming", " works", " fine."
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert all("role" not in c["choices"][0]["delta"] for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == (
        "Streaming works fine."
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not chunks[-1]["choices"][0]["delta"].get("content")
    assert not any("usage" in c for c in chunks)


async def test_stream_include_usage(client: httpx.AsyncClient, scripted: ScriptedBackend) -> None:
    scripted.enqueue("a b c d")
    r = await client.post(
        URL,
        headers=KEY,
        json={"messages": user("Hello"), "stream": True, "stream_options": {"include_usage": True}},
    )
    payloads = events(r)
    assert payloads[-1] == "[DONE]"
    finish, usage_chunk = payloads[-3], payloads[-2]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    prompt = scripted.prompt_tokens(scripted.calls[-1].messages)
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 4,
        "total_tokens": prompt + 4,
    }
    assert sum(1 for p in payloads if isinstance(p, dict) and "usage" in p) == 1


async def test_stream_include_usage_false_sends_no_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        URL,
        headers=KEY,
        json={"messages": user("Hi"), "stream": True, "stream_options": {"include_usage": False}},
    )
    assert not any(isinstance(p, dict) and "usage" in p for p in events(r))


async def test_stream_max_tokens_ends_with_length(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    scripted.enqueue("one two three four")
    r = await client.post(
        URL, headers=KEY, json={"messages": user("x"), "stream": True, "max_tokens": 2}
    )
    chunks = events(r)[:-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "one two"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_streamed_reply_is_persisted(client: httpx.AsyncClient) -> None:
    await client.post(URL, headers=KEY, json={"messages": user("first"), "stream": True})
    r = await client.post(URL, headers=KEY, json={"messages": user("second")})
    assert r.json()["choices"][0]["message"]["content"] == "Echo 2: second"


# --- models ---------------------------------------------------------------------------


async def test_models_list_every_model_and_alias(settings: Settings, tmp_path: Path) -> None:
    configured = dataclasses.replace(settings, config=two_models_config(tmp_path))
    async with running(configured) as (_, client):
        r = await client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["scripted", "echo", "tiny", "other", "other-alias"]
    for entry in body["data"]:
        assert set(entry) == {"id", "object", "created", "owned_by"}
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert isinstance(entry["owned_by"], str) and entry["owned_by"]


async def test_model_field_names_the_model_that_served(settings: Settings, tmp_path: Path) -> None:
    configured = dataclasses.replace(settings, config=two_models_config(tmp_path))
    async with running(configured) as (app, client):
        default = app.state.models.get("scripted").backend
        other = app.state.models.get("other").backend
        r = await client.post(
            URL, headers=KEY, json={"model": "other-alias", "messages": user("hi")}
        )
        assert r.json()["model"] == "other"
        assert (len(other.calls), len(default.calls)) == (1, 0)
        r = await client.post(
            URL,
            headers={"x-session-key": "k2"},
            json={"model": "tiny", "messages": user("hi"), "stream": True},
        )
        assert {c["model"] for c in events(r)[:-1]} == {"scripted"}
        assert len(default.calls) == 1


async def test_unknown_model_is_served_by_the_default(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    r = await client.post(URL, headers=KEY, json={"model": "gpt-4o", "messages": user("hi")})
    assert r.status_code == 200
    assert r.json()["model"] == "scripted"
    assert len(scripted.calls) == 1
    r = await client.post(
        URL, headers=KEY, json={"model": "nanobot", "messages": user("hi"), "stream": True}
    )
    assert {c["model"] for c in events(r)[:-1]} == {"scripted"}


async def test_strict_mode_rejects_unknown_model(settings: Settings) -> None:
    async with running(dataclasses.replace(settings, strict_models=True)) as (app, client):
        r = await client.post(URL, headers=KEY, json={"model": "gpt-4o", "messages": user("hi")})
        assert r.status_code == 404
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "model_not_found"
        assert error["param"] == "model"
        assert error["type"] == "invalid_request_error"
        assert "gpt-4o" in error["message"]
        assert app.state.models.default.backend.calls == []
        ok = await client.post(URL, headers=KEY, json={"model": "scripted", "messages": user("x")})
        assert ok.status_code == 200


# --- health ---------------------------------------------------------------------------


class GatedBackend(ScriptedBackend):
    """A scripted backend whose load() waits until the test opens the gate."""

    def __init__(self, gate: asyncio.Event) -> None:
        super().__init__()
        self.gate = gate
        self.loaded = False

    @property
    def ready(self) -> bool:
        return self.loaded

    async def load(self) -> None:
        await self.gate.wait()
        self.loaded = True


async def test_health_when_loaded(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["ready"] is True
    assert body["model"] == "scripted"


async def test_health_and_chat_before_the_model_is_loaded(settings: Settings) -> None:
    gate = asyncio.Event()
    backend = GatedBackend(gate)
    registry = ModelRegistry(
        [LoadedModel(spec=ModelSpec(name="gated", backend="scripted"), backend=backend, created=0)],
        default="gated",
    )
    async with running(settings, registry, wait=False) as (app, client):
        r = await client.get("/health")
        assert r.status_code == 503
        assert r.json()["ready"] is False
        assert r.json()["status"] != "ok"
        for stream in (False, True):
            r = await client.post(URL, headers=KEY, json={"messages": user("hi"), "stream": stream})
            assert r.status_code == 503
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "model_not_ready"
            assert "gated" in error["message"]
        assert backend.calls == []

        gate.set()
        await app.state.models.wait_loaded()
        r = await client.get("/health")
        assert (r.status_code, r.json()["status"], r.json()["ready"]) == (200, "ok", True)
        r = await client.post(URL, headers=KEY, json={"messages": user("hi")})
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "Echo 1: hi"


# --- the official openai SDK ----------------------------------------------------------


@pytest.fixture
async def sdk(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official async client talking to the in-process app with a session key."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
        yield openai.AsyncOpenAI(
            base_url="http://localhost/v1",
            api_key="unused",
            http_client=http,  # type: ignore[arg-type]
            default_headers={"x-session-key": "sdk:session"},
            max_retries=0,
        )


async def test_sdk_non_streamed(sdk: openai.AsyncOpenAI, scripted: ScriptedBackend) -> None:
    scripted.enqueue("Hello from parlour.")
    completion = await sdk.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Hello"}]
    )
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "scripted"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello from parlour."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    assert completion.usage.prompt_tokens == scripted.prompt_tokens(scripted.calls[-1].messages)
    again = await sdk.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "More"}]
    )
    assert again.choices[0].message.content == "Echo 2: More"


async def test_sdk_streamed(sdk: openai.AsyncOpenAI, scripted: ScriptedBackend) -> None:
    scripted.enqueue("Streamed through the SDK.")
    stream = await sdk.chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Streamed through the SDK."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == 4
    assert usage.prompt_tokens == scripted.prompt_tokens(scripted.calls[-1].messages)
    assert usage.total_tokens == usage.prompt_tokens + 4


async def test_sdk_errors_map_to_exceptions(app: FastAPI, sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Hi"}], temperature=3
        )
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_value"
    assert raised.value.param == "temperature"

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
        keyless = openai.AsyncOpenAI(
            base_url="http://localhost/v1",
            api_key="unused",
            http_client=http,  # type: ignore[arg-type]
            max_retries=0,
        )
        with pytest.raises(openai.BadRequestError) as raised:
            await keyless.chat.completions.create(
                model="scripted", messages=[{"role": "user", "content": "Hi"}]
            )
    assert raised.value.code == "missing_session_key"
    assert raised.value.param == "x-session-key"


async def test_sdk_lists_models(sdk: openai.AsyncOpenAI) -> None:
    models = [m async for m in sdk.models.list()]
    assert [m.id for m in models] == ["scripted"]
    assert models[0].object == "model"
