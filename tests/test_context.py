"""The context window: the per-message estimate, and refusals that leave the store as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
from fastapi import FastAPI

from parlour.app import create_app
from parlour.models import embedded_gguf
from parlour.settings import Settings
from parlour.turns.context import MESSAGE_OVERHEAD

URL = "/v1/chat/completions"


def test_message_overhead_does_not_undercount_the_embedded_template() -> None:
    from llama_cpp import Llama

    vocab = Llama(model_path=str(embedded_gguf()), vocab_only=True, verbose=False)
    template = jinja2.Environment().from_string(vocab.metadata["tokenizer.chat_template"])

    def tokens(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=True))

    def rendered(messages: list[dict[str, str]]) -> int:
        return tokens(template.render(messages=messages, add_generation_prompt=False))

    system = {"role": "system", "content": "Be brief."}
    framing: dict[str, int] = {}
    for role in ("system", "user", "assistant"):
        for content in ("Hi", "What is the capital of France?", "Paris, of course."):
            added = rendered([system, {"role": role, "content": content}]) - rendered([system])
            framing[role] = max(framing.get(role, 0), added - tokens(content))
    assert framing["assistant"] == 6  # `assistant` is two tokens in SmolLM2's vocabulary
    assert max(framing.values()) <= MESSAGE_OVERHEAD


@pytest.fixture
async def small(tmp_path: Path, database_url: str | None) -> Any:
    """An app whose scripted model has a 64-token context, and a client for it."""
    config = tmp_path / "small.toml"
    config.write_text(
        '[[models]]\nname = "scripted"\nbackend = "scripted"\ncontext_length = 64\n',
        encoding="utf-8",
    )
    app = create_app(
        Settings(
            data_dir=tmp_path / "data", model="scripted", config=config, database_url=database_url
        )
    )
    async with app.router.lifespan_context(app):
        await app.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield app, client


async def titles(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/conversations")
    assert response.status_code == 200, response.text
    return [c["title"] for c in response.json()]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_refused_first_message_leaves_no_conversation(
    small: tuple[FastAPI, httpx.AsyncClient], stream: bool
) -> None:
    _app, client = small
    too_long = " ".join(f"w{i}" for i in range(60))
    refused = await client.post(
        URL,
        headers={"x-session-key": "fresh"},
        json={"messages": [{"role": "user", "content": too_long}], "stream": stream},
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert await titles(client) == []

    # A system prompt that alone leaves no room is refused the same way.
    refused = await client.post(
        URL,
        headers={"x-session-key": "fresh"},
        json={
            "messages": [
                {"role": "system", "content": too_long},
                {"role": "user", "content": "hi"},
            ]
        },
    )
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert await titles(client) == []

    ok = await client.post(
        URL,
        headers={"x-session-key": "fresh"},
        json={"messages": [{"role": "user", "content": "hello"}]},
    )
    assert ok.json()["choices"][0]["message"]["content"] == "Echo 1: hello"
    assert await titles(client) == ["hello"]

    # On a session that exists, a refusal changes nothing either.
    refused = await client.post(
        URL,
        headers={"x-session-key": "fresh"},
        json={"messages": [{"role": "user", "content": too_long}]},
    )
    assert refused.status_code == 400
    assert await titles(client) == ["hello"]
    listing = await client.get(
        f"/conversations/{(await client.get('/conversations')).json()[0]['id']}/messages"
    )
    assert [m["content"] for m in listing.json()] == ["hello", "Echo 1: hello"]
