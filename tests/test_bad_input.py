"""Bad input of any kind is a 4xx in the dialect's error shape, never a 5xx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.dialects import make_bot

JSON = {"content-type": "application/json"}
BIG = str(2**63)


async def _post(client: httpx.AsyncClient, path: str, raw: str) -> httpx.Response:
    return await client.post(path, content=raw.encode(), headers=JSON)


async def _conversation(client: httpx.AsyncClient) -> str:
    created = await client.post("/conversations", json={"title": "t", "model_tag": "scripted"})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _detail(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    return detail


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_non_finite_numbers_are_422_not_500(client: httpx.AsyncClient, number: str) -> None:
    conversation = await _conversation(client)
    message = await _post(
        client,
        f"/conversations/{conversation}/messages",
        f'{{"message": {{"content": "hi"}}, "stream": false, "temperature": {number}}}',
    )
    assert _detail(message)[0]["loc"] == ["body", "temperature"]
    bot = await _post(
        client,
        "/admin/bots",
        f'{{"slug": "b", "name": "B", "system_prompt": "x", "temperature": {number}}}',
    )
    assert _detail(bot)[0]["loc"] == ["body", "temperature"]


async def test_lone_surrogates_are_refused_in_every_dialect(client: httpx.AsyncClient) -> None:
    conversation = await _conversation(client)
    surrogate = '"\\ud800"'
    created = await _post(client, "/conversations", f'{{"title": {surrogate}, "model_tag": "x"}}')
    assert _detail(created)[0]["loc"] == ["body", "title"]
    renamed = await client.patch(
        f"/conversations/{conversation}", content=f'{{"title": {surrogate}}}', headers=JSON
    )
    assert _detail(renamed)[0]["loc"] == ["body", "title"]
    message = await _post(
        client,
        f"/conversations/{conversation}/messages",
        f'{{"message": {{"content": {surrogate}}}, "stream": false}}',
    )
    assert _detail(message)[0]["loc"] == ["body", "message", "content"]

    await make_bot(client, slug="x")
    for path in ("/chat", "/v1/chat"):
        chat = await _post(
            client, path, f'{{"bot_slug": "x", "prompt": {surrogate}, "stream": false}}'
        )
        first = _detail(chat)[0]
        assert (first["loc"], first["type"]) == (["body", "prompt"], "value_error.str.unicode")
        assert "Unicode" in chat.json()["detail"][0]["msg"]
    openai = await client.post(
        "/v1/chat/completions",
        content=f'{{"messages": [{{"role": "user", "content": {surrogate}}}]}}'.encode(),
        headers={**JSON, "x-session-key": "k"},
    )
    assert openai.status_code == 400 and openai.json()["error"]["code"] == "invalid_json"
    kernel2 = await _post(
        client, "/api/kernel2/chat", f'{{"messages": [{{"role": "user", "content": {surrogate}}}]}}'
    )
    assert kernel2.status_code == 400 and "surrogate" in kernel2.json()["message"]


async def test_unencodable_values_are_never_echoed(client: httpx.AsyncClient) -> None:
    await make_bot(client, slug="x")
    # The Bot API echoes a bad role in ctx.given; NaN cannot be written back.
    chat = await _post(
        client,
        "/chat",
        '{"bot_slug": "x", "messages": [{"role": NaN, "content": "a"}], "stream": false}',
    )
    detail = _detail(chat)
    assert detail[0]["loc"] == ["body", "messages", 0, "role"]
    assert "ctx" not in detail[0]


async def test_integers_past_the_bound_are_refused(client: httpx.AsyncClient) -> None:
    conversation = await _conversation(client)
    listed = await client.get("/conversations", params={"offset": BIG})
    assert _detail(listed)[0]["loc"] == ["query", "offset"]
    messages = await client.get(f"/conversations/{conversation}/messages", params={"offset": BIG})
    assert _detail(messages)[0]["loc"] == ["query", "offset"]
    bot = await _post(
        client,
        "/admin/bots",
        f'{{"slug": "b", "name": "B", "system_prompt": "x", "max_tokens": {BIG}}}',
    )
    assert _detail(bot)[0]["loc"] == ["body", "max_tokens"]
    await make_bot(client, slug="x")
    chat = await _post(
        client, "/chat", f'{{"bot_slug": "x", "prompt": "a", "stream": false, "max_words": {BIG}}}'
    )
    assert _detail(chat)[0]["type"] == "value_error.number.not_le"
    openai = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 2**63},
        headers={"x-session-key": "k"},
    )
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "max_tokens"
    kernel2 = await client.post(
        "/api/kernel2/chat",
        json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 2**63},
    )
    assert kernel2.status_code == 400 and "max_tokens" in kernel2.json()["message"]


@pytest.mark.parametrize("field", ["max_tokens", "temperature"])
async def test_booleans_are_not_numbers(client: httpx.AsyncClient, field: str) -> None:
    conversation = await _conversation(client)
    response = await client.post(
        f"/conversations/{conversation}/messages",
        json={"message": {"content": "hi"}, "stream": False, field: True},
    )
    assert _detail(response)[0]["loc"] == ["body", field]
    bot = await client.post(
        "/admin/bots", json={"slug": "b", "name": "B", "system_prompt": "x", field: True}
    )
    assert _detail(bot)[0]["loc"] == ["body", field]


async def test_empty_turns_are_refused(client: httpx.AsyncClient) -> None:
    empties: list[Any] = [[], "", None]
    for content in empties:
        response = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": content}]},
            headers={"x-session-key": "k"},
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "messages"
    kernel2 = await client.post(
        "/api/kernel2/chat", json={"messages": [{"role": "user", "content": []}]}
    )
    assert kernel2.status_code == 400 and "no user message" in kernel2.json()["message"]
    conversation = await _conversation(client)
    empty = await client.post(
        f"/conversations/{conversation}/messages", json={"message": {"content": ""}}
    )
    assert _detail(empty)[0]["loc"] == ["body", "message", "content"]
    listed = await client.get(f"/conversations/{conversation}/messages")
    assert listed.json() == []


async def test_nul_in_text_is_refused(client: httpx.AsyncClient) -> None:
    created = await client.post("/conversations", json={"title": "a\x00b", "model_tag": "x"})
    assert _detail(created)[0]["loc"] == ["body", "title"]
    openai = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a\x00b"}]},
        headers={"x-session-key": "k"},
    )
    assert openai.status_code == 400 and "NUL" in openai.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "error_of"),
    [
        ("/conversations", lambda body: body["detail"]),
        ("/v1/chat/completions", lambda body: body["error"]["message"]),
        ("/api/kernel2/chat", lambda body: body["message"]),
    ],
)
async def test_wrong_method_names_the_allowed_ones(
    client: httpx.AsyncClient, path: str, error_of: Any
) -> None:
    response = await client.request("OPTIONS", path)
    assert response.status_code == 405
    assert response.headers.get("allow")
    assert error_of(response.json())


@pytest.mark.parametrize(
    ("path", "message_of"),
    [
        ("/admin/bots/a%00b", lambda body: body["detail"]),
        ("/admin/kbs/x/search?q=a%00b", lambda body: body["detail"]),
        ("/v1/usage?user_id=a%00b", lambda body: body["detail"]),
        ("/conversations?limit=1&x=%00", lambda body: body["detail"]),
        ("/v1/models?x=%00", lambda body: body["error"]["message"]),
    ],
)
async def test_nul_in_the_url_is_refused(
    client: httpx.AsyncClient, path: str, message_of: Any
) -> None:
    response = await client.get(path)
    assert response.status_code == 400, response.text
    assert "NUL" in message_of(response.json())
