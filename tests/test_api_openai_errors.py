"""Errors of the OpenAI dialect: right status, OpenAI's error object, the parameter named."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from parlour.app import create_app
from parlour.backends.base import ChatMessage, Chunk, GenerationParams
from parlour.backends.scripted import ScriptedBackend, ScriptedCall
from parlour.errors import BackendUnavailable
from parlour.models import LoadedModel, ModelRegistry, ModelSpec
from parlour.settings import Settings
from parlour.store.tables import Conversation, Message

URL = "/v1/chat/completions"
KEY = {"x-session-key": "wx:dm:errors"}
HELLO = [{"role": "user", "content": "hello"}]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check the status and OpenAI's error shape, and return the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    return error


async def message_count(app: FastAPI) -> int:
    """How many messages the store holds."""
    async with app.state.db.session() as session:
        count: int = await session.scalar(select(func.count()).select_from(Message))
        return count


StartApp = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def app_with(settings: Settings) -> AsyncIterator[StartApp]:
    """Start apps from altered settings; each is shut down when the test ends."""
    async with AsyncExitStack() as stack:

        async def start(**changes: Any) -> httpx.AsyncClient:
            application = create_app(dataclasses.replace(settings, **changes))
            await stack.enter_async_context(application.router.lifespan_context(application))
            await application.state.models.wait_loaded()
            transport = httpx.ASGITransport(app=application)
            return await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://localhost")
            )

        yield start


# --- the session key ------------------------------------------------------------------

MISSING_KEY = {
    "error": {
        "message": "Missing required header: x-session-key. Send the session in the "
        "x-session-key header or a `session_id` body field, or start the server with "
        "PARLOUR_SESSIONLESS=stateless to answer requests without a session from their "
        "messages alone.",
        "type": "invalid_request_error",
        "param": "x-session-key",
        "code": "missing_session_key",
    }
}


async def test_missing_session_key(client: httpx.AsyncClient, scripted: ScriptedBackend) -> None:
    r = await client.post(URL, json={"model": "nanobot", "messages": HELLO})
    assert r.status_code == 400
    assert r.json() == MISSING_KEY
    r = await client.post(URL, json={"messages": HELLO, "stream": True})
    assert (r.status_code, r.json()) == (400, MISSING_KEY)
    assert scripted.calls == []


async def test_empty_session_key(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, headers={"x-session-key": ""}, json={"messages": HELLO})
    assert r.status_code == 400
    assert r.json() == MISSING_KEY


async def test_missing_key_is_reported_before_a_bad_body(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, content=b"not json", headers={"content-type": "application/json"})
    assert r.json() == MISSING_KEY


@pytest.mark.parametrize(
    "value",
    [b"x" * 257, b"tab\there", b"bell\x07", b"del\x7f", b"\xc2\x85next-line"],
    ids=["too-long", "tab", "bell", "del", "c1-control"],
)
async def test_invalid_session_key(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend, value: bytes
) -> None:
    r = await client.post(URL, headers=[(b"x-session-key", value)], json={"messages": HELLO})
    error = error_of(r, 400)
    assert error["param"] == "x-session-key"
    assert error["code"] == "invalid_session_key"
    assert error["type"] == "invalid_request_error"
    assert scripted.calls == [] and await message_count(app) == 0


# --- bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": [',
        b"{'messages': []}",
        b"[]",
        b'[{"role": "user", "content": "hi"}]',
        b'"hello"',
        b"42",
        b"null",
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
        b"\xff\xfe{}",
        b"",
        b"   \n",
        b"[" * 100_000,
        b'{"messages": [{"role": "user", "content": "\\ud800 lone surrogate"}]}',
    ],
    ids=[
        "truncated",
        "single-quotes",
        "array",
        "array-of-messages",
        "string",
        "number",
        "null",
        "latin-1",
        "utf-16-bom",
        "empty",
        "blank",
        "deeply-nested",
        "lone-surrogate",
    ],
)
async def test_unusable_body(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend, raw: bytes
) -> None:
    r = await client.post(URL, headers={**KEY, "content-type": "application/json"}, content=raw)
    error = error_of(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"
    assert scripted.calls == [] and await message_count(app) == 0


async def test_two_megabyte_body(client: httpx.AsyncClient) -> None:
    big = [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]
    error = error_of(await client.post(URL, headers=KEY, json={"messages": big}), 413)
    assert error["code"] == "request_too_large"
    assert "PARLOUR_MAX_BODY_BYTES" in error["message"]


async def test_body_over_a_configured_limit(app_with: StartApp) -> None:
    client = await app_with(max_body_bytes=1000)
    small = {"messages": [{"role": "user", "content": "x" * 800}]}
    assert (await client.post(URL, headers=KEY, json=small)).status_code == 200
    large = {"messages": [{"role": "user", "content": "x" * 1200}]}
    assert error_of(await client.post(URL, headers=KEY, json=large), 413)["code"] == (
        "request_too_large"
    )

    async def chunked() -> AsyncIterator[bytes]:
        # No content-length: the limit must hold while the body streams in.
        payload = json.dumps(large).encode()
        for start in range(0, len(payload), 100):
            yield payload[start : start + 100]

    r = await client.post(
        URL, headers={**KEY, "content-type": "application/json"}, content=chunked()
    )
    assert "content-length" not in r.request.headers
    assert error_of(r, 413)["code"] == "request_too_large"


# --- every parameter ------------------------------------------------------------------

BAD_PARAMETERS: list[tuple[str, dict[str, Any], str]] = [
    ("temperature-high", {"temperature": 3}, "temperature"),
    ("temperature-negative", {"temperature": -1}, "temperature"),
    ("temperature-string", {"temperature": "hot"}, "temperature"),
    ("top_p-high", {"top_p": 1.5}, "top_p"),
    ("top_p-negative", {"top_p": -0.1}, "top_p"),
    ("top_p-string", {"top_p": "all"}, "top_p"),
    ("max_tokens-zero", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens-negative", {"max_tokens": -5}, "max_tokens"),
    ("max_tokens-string", {"max_tokens": "x"}, "max_tokens"),
    ("max_tokens-float", {"max_tokens": 2.5}, "max_tokens"),
    ("max_completion_tokens-zero", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("max_completion_tokens-string", {"max_completion_tokens": "10"}, "max_completion_tokens"),
    ("stop-five", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stop-number", {"stop": 7}, "stop"),
    ("stop-list-of-numbers", {"stop": ["a", 2]}, "stop[1]"),
    ("seed-string", {"seed": "x"}, "seed"),
    ("seed-float", {"seed": 1.5}, "seed"),
    ("presence_penalty-high", {"presence_penalty": 3}, "presence_penalty"),
    ("presence_penalty-string", {"presence_penalty": "some"}, "presence_penalty"),
    ("frequency_penalty-low", {"frequency_penalty": -3}, "frequency_penalty"),
    ("frequency_penalty-string", {"frequency_penalty": "lots"}, "frequency_penalty"),
    ("stream-string", {"stream": "yes"}, "stream"),
    ("stream-number", {"stream": 1}, "stream"),
    ("stream_options-string", {"stream_options": "usage"}, "stream_options"),
    (
        "include_usage-string",
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    ("n-two", {"n": 2}, "n"),
    ("n-zero", {"n": 0}, "n"),
    ("n-string", {"n": "1"}, "n"),
    ("user-number", {"user": 5}, "user"),
    ("model-number", {"model": 5}, "model"),
    ("model-list", {"model": ["scripted"]}, "model"),
]


@pytest.mark.parametrize(
    ("extra", "param"),
    [pytest.param(extra, param, id=name) for name, extra, param in BAD_PARAMETERS],
)
async def test_bad_parameter(
    app: FastAPI,
    client: httpx.AsyncClient,
    scripted: ScriptedBackend,
    extra: dict[str, Any],
    param: str,
) -> None:
    r = await client.post(URL, headers=KEY, json={"messages": HELLO, **extra})
    error = error_of(r, 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["code"] in {"invalid_value", "invalid_type"}
    assert param.split(".")[0] in error["message"]
    assert scripted.calls == [] and await message_count(app) == 0


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'"temperature": NaN', "temperature"),
        (b'"top_p": Infinity', "top_p"),
        (b'"presence_penalty": -Infinity', "presence_penalty"),
        (b'"max_tokens": 1e999', "max_tokens"),
    ],
)
async def test_non_finite_numbers(client: httpx.AsyncClient, raw: bytes, param: str) -> None:
    # Python's json accepts these spellings, so validation has to refuse them.
    body = b'{"messages": [{"role": "user", "content": "hi"}], ' + raw + b"}"
    r = await client.post(URL, headers={**KEY, "content-type": "application/json"}, content=body)
    assert error_of(r, 400)["param"] == param


BAD_MESSAGES: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing", {}, "messages", "missing_required_parameter"),
    ("empty", {"messages": []}, "messages", "invalid_value"),
    ("null", {"messages": None}, "messages", "invalid_type"),
    ("string", {"messages": "hello"}, "messages", "invalid_type"),
    ("object", {"messages": {"role": "user", "content": "hi"}}, "messages", "invalid_type"),
    ("item-not-object", {"messages": ["hello"]}, "messages[0]", "invalid_type"),
    (
        "no-role",
        {"messages": [{"content": "hi"}]},
        "messages[0].role",
        "missing_required_parameter",
    ),
    ("bad-role", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", ""),
    ("role-number", {"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role", ""),
    ("content-number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ""),
    (
        "content-object",
        {"messages": [{"role": "user", "content": {"text": "hi"}}]},
        "messages[0].content",
        "",
    ),
    (
        "second-message",
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": 5}]},
        "messages[1].content",
        "",
    ),
    (
        "part-without-type",
        {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
        "messages[0].content[0].type",
        "missing_required_parameter",
    ),
    (
        "part-text-number",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "messages[0].content[0].text",
        "",
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [pytest.param(body, param, code, id=name) for name, body, param, code in BAD_MESSAGES],
)
async def test_bad_messages(
    app: FastAPI,
    client: httpx.AsyncClient,
    scripted: ScriptedBackend,
    body: dict[str, Any],
    param: str,
    code: str,
) -> None:
    error = error_of(await client.post(URL, headers=KEY, json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    assert scripted.calls == [] and await message_count(app) == 0


async def test_image_part_is_rejected(app: FastAPI, client: httpx.AsyncClient) -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    r = await client.post(
        URL, headers=KEY, json={"messages": [{"role": "user", "content": content}]}
    )
    error = error_of(r, 400)
    assert error["param"] == "messages[0].content[1].type"
    assert "image_url" in error["message"]
    assert await message_count(app) == 0


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You are terse."}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "Be brief."},
        ],
    ],
    ids=["only-system", "ends-with-assistant", "system-after-assistant"],
)
async def test_no_user_message_in_the_new_turn(
    app: FastAPI, client: httpx.AsyncClient, messages: list[dict[str, Any]]
) -> None:
    error = error_of(await client.post(URL, headers=KEY, json={"messages": messages}), 400)
    assert error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
    assert "user" in error["message"]
    assert await message_count(app) == 0


async def test_unknown_route_and_method_keep_the_shape(client: httpx.AsyncClient) -> None:
    error_of(await client.get(URL, headers=KEY), 405)
    error_of(await client.post("/v1/models", headers=KEY), 405)


# --- context length -------------------------------------------------------------------


@pytest.fixture
async def small_client(app_with: StartApp, tmp_path: Path) -> httpx.AsyncClient:
    """A client for an app whose scripted model has a 64-token context."""
    config = tmp_path / "small.toml"
    config.write_text(
        '[[models]]\nname = "scripted"\nbackend = "scripted"\ncontext_length = 64\n',
        encoding="utf-8",
    )
    return await app_with(config=config, model="scripted")


@pytest.mark.parametrize("stream", [False, True])
async def test_new_message_longer_than_the_context(
    small_client: httpx.AsyncClient, stream: bool
) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    r = await small_client.post(
        URL,
        headers=KEY,
        json={"messages": [{"role": "user", "content": words}], "stream": stream},
    )
    error = error_of(r, 400)
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
    assert "64" in error["message"]
    # The session is still usable, and the refused message was not stored.
    ok = await small_client.post(URL, headers=KEY, json={"messages": HELLO})
    assert ok.json()["choices"][0]["message"]["content"] == "Echo 1: hello"


async def test_max_tokens_leaving_no_room_for_the_prompt(small_client: httpx.AsyncClient) -> None:
    r = await small_client.post(URL, headers=KEY, json={"messages": HELLO, "max_tokens": 62})
    assert error_of(r, 400)["code"] == "context_length_exceeded"
    r = await small_client.post(URL, headers=KEY, json={"messages": HELLO, "max_tokens": 20})
    assert r.status_code == 200


async def test_errors_do_not_create_conversations(app: FastAPI, client: httpx.AsyncClient) -> None:
    await client.post(URL, headers=KEY, json={"messages": HELLO, "temperature": 9})
    await client.post(URL, headers=KEY, json={"messages": []})
    async with app.state.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Conversation)) == 0


# --- failures inside the backend ------------------------------------------------------


class FailingBackend(ScriptedBackend):
    """Streams two pieces, then loses its upstream."""

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        session: str | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        self.calls.append(ScriptedCall(tuple(messages), params, session))
        yield Chunk(text="partial")
        yield Chunk(text=" reply")
        raise BackendUnavailable("The upstream went away; try again.")


@pytest.fixture
async def failing(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app whose only model fails mid-reply."""
    registry = ModelRegistry(
        [
            LoadedModel(
                spec=ModelSpec(name="flaky", backend="scripted"),
                backend=FailingBackend(),
                created=0,
            )
        ],
        default="flaky",
    )
    application = create_app(settings, models=registry)
    async with application.router.lifespan_context(application):
        await registry.wait_loaded()
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield application, c


async def test_error_after_the_stream_started(
    failing: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = failing
    r = await client.post(URL, headers=KEY, json={"messages": HELLO, "stream": True})
    assert r.status_code == 200
    blocks = [b.removeprefix("data: ") for b in r.text.split("\n\n") if b.strip()]
    assert blocks[-1] == "[DONE]"
    payloads = [json.loads(b) for b in blocks[:-1]]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads[1:-1])
    assert text == "partial reply"
    error = payloads[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "backend_unavailable"
    async with app.state.db.session() as session:
        rows = (await session.scalars(select(Message).order_by(Message.position))).all()
    assert [(m.role, m.content, m.finish_reason) for m in rows] == [
        ("user", "hello", None),
        ("assistant", "partial reply", "error"),
    ]


async def test_backend_failure_without_streaming(
    failing: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = failing
    error = error_of(await client.post(URL, headers=KEY, json={"messages": HELLO}), 503)
    assert error["code"] == "backend_unavailable"
    assert error["type"] == "server_error"
    assert await message_count(app) == 2
