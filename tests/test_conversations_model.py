"""The conversations API on a real server with JWT auth and the embedded SmolLM2 model."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from llama_cpp import Llama

from parlour.models import embedded_gguf
from tests.conftest import ServerProcess
from tests.support.auth import SECRET, bearer, hs256
from tests.test_api_conversations import conversation, message

pytestmark = pytest.mark.model


def stream_events(client: httpx.Client, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST and read the event stream as it arrives, one `data:` line per event."""
    parsed: list[dict[str, Any]] = []
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: "), line
                parsed.append(json.loads(line.removeprefix("data: ")))
    return parsed


def test_streamed_reply_is_persisted_with_real_counts(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={"PARLOUR_JWT_SECRET": SECRET})
    model = httpx.get(f"{server.url}/health", timeout=10).json()["model"]
    headers = bearer(hs256("alice"))
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
        made = client.post("/conversations", json={"title": "", "model_tag": model})
        assert made.status_code == 201, made.text
        cid = conversation(made.json())["id"]
        question = "Name three colours of the rainbow."
        events = stream_events(
            client,
            f"/conversations/{cid}/messages",
            {"message": {"role": "user", "content": question}, "max_tokens": 24},
        )
        tokens, done = events[:-1], events[-1]
        assert tokens and all(set(e) == {"token"} and e["token"] for e in tokens)
        assert done["done"] is True
        reply = message(done["message"])
        assert reply["content"] == "".join(e["token"] for e in tokens)
        assert reply["role"] == "assistant" and reply["model_tag"] == model

        history = client.get(f"/conversations/{cid}/messages")
        assert history.status_code == 200
        user, assistant = (message(m) for m in history.json())
        assert user["role"] == "user" and user["content"] == question
        assert assistant == reply
        assert assistant["inference_time_ms"] > 0  # measured, whatever the speed

        # Token counts are the model tokenizer's, not an estimate.
        reference = Llama(model_path=str(embedded_gguf()), vocab_only=True, verbose=False)
        try:
            for stored in (user, assistant):
                expected = len(reference.tokenize(stored["content"].encode(), False, False))
                assert stored["token_count"] == expected > 0
        finally:
            reference.close()

        titled = client.get(f"/conversations/{cid}").json()
        assert titled["title"] == question
        other = client.get(f"/conversations/{cid}", headers=bearer(hs256("bob")))
        assert other.status_code == 404
        assert client.get("/conversations", headers={"Authorization": ""}).status_code == 401
