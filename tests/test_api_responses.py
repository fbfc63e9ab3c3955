"""OpenAI's Responses API through the official SDK: objects, streams, chains, forks, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from parlour.backends.base import ChatMessage
from parlour.backends.scripted import ScriptedBackend
from parlour.settings import Settings
from parlour.store import responses as store

from .support.auth import SECRET, hs256

SdkFactory = Callable[[str], openai.AsyncOpenAI]


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    """Scripted model, JWT auth so that two owners can be told apart."""
    return Settings(
        data_dir=tmp_path / "data", model="scripted", database_url=database_url, jwt_secret=SECRET
    )


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the in-process app, authenticated as alice."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://parlour.test",
        headers={"Authorization": f"Bearer {hs256('alice')}"},
    ) as client:
        yield client


@pytest.fixture
def sdk_for(http: httpx.AsyncClient) -> SdkFactory:
    """The official async client acting for the named owner."""

    def make(owner: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://parlour.test/v1",
            api_key=hs256(owner),
            http_client=http,  # type: ignore[arg-type]
            max_retries=0,
        )

    return make


@pytest.fixture
def sdk(sdk_for: SdkFactory) -> openai.AsyncOpenAI:
    """The official async client acting for alice."""
    return sdk_for("alice")


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON body) of each event of a stream."""
    found: list[tuple[str, dict[str, Any]]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = block.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: "), block
        found.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return found


async def test_string_input_gives_a_response_object(
    sdk: openai.AsyncOpenAI, scripted: ScriptedBackend
) -> None:
    scripted.enqueue("Hello from parlour.")
    response = await sdk.responses.create(model="scripted", input="Hi there", metadata={"a": "b"})
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "scripted"
    assert response.output_text == "Hello from parlour."
    message = response.output[0]
    assert message.type == "message" and message.id.startswith("msg_")
    assert message.role == "assistant" and message.status == "completed"
    assert response.metadata == {"a": "b"}
    assert response.usage is not None
    assert response.usage.output_tokens == 3
    assert response.usage.input_tokens == scripted.calls[-1].messages[0].content.count(" ") + 4
    assert response.usage.total_tokens == response.usage.input_tokens + 3
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    stored = await sdk.responses.retrieve(response.id)
    assert stored.output_text == "Hello from parlour." and stored.status == "completed"


async def test_item_input_with_system_and_parts(
    sdk: openai.AsyncOpenAI, scripted: ScriptedBackend
) -> None:
    response = await sdk.responses.create(
        model="scripted",
        instructions="Answer briefly.",
        input=[
            {"role": "developer", "content": "Use French."},
            {"role": "user", "content": [{"type": "input_text", "text": "Bonjour"}]},
        ],
    )
    assert response.output_text == "Echo 1: Bonjour"
    assert response.instructions == "Answer briefly."
    sent = scripted.calls[-1].messages
    assert sent[0].role == "system"
    assert "Answer briefly." in sent[0].content and "Use French." in sent[0].content
    assert [(m.role, m.content) for m in sent[1:]] == [("user", "Bonjour")]
    items = await sdk.responses.input_items.list(response.id, order="asc")
    assert [i.role for i in items.data] == ["developer", "user"]  # type: ignore[union-attr]


async def test_sdk_stream_helper(sdk: openai.AsyncOpenAI, scripted: ScriptedBackend) -> None:
    scripted.enqueue("Streamed through the helper.")
    deltas: list[str] = []
    async with sdk.responses.stream(model="scripted", input="Stream please") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert "".join(deltas) == "Streamed through the helper."
    assert final.output_text == "Streamed through the helper."
    assert final.status == "completed"


async def test_raw_events_in_order(http: httpx.AsyncClient, scripted: ScriptedBackend) -> None:
    scripted.enqueue("One two three")
    reply = await http.post("/v1/responses", json={"input": "Count", "stream": True})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert [body["sequence_number"] for _, body in events] == list(range(len(events)))
    assert all(name == body["type"] for name, body in events)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[7][1]["text"] == "One two three"
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == "One two three"


async def test_max_output_tokens_makes_it_incomplete(
    http: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    scripted.enqueue("one two three four five")
    reply = await http.post(
        "/v1/responses", json={"input": "Go", "stream": True, "max_output_tokens": 2}
    )
    name, body = sse_events(reply.text)[-1]
    assert name == "response.incomplete"
    assert body["response"]["status"] == "incomplete"
    assert body["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["response"]["output"][0]["content"][0]["text"] == "one two"


def _turns(backend: ScriptedBackend) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in backend.calls[-1].messages]


async def test_chain_and_fork(sdk: openai.AsyncOpenAI, scripted: ScriptedBackend) -> None:
    first = await sdk.responses.create(input="first", instructions="Be kind.")
    second = await sdk.responses.create(input="second", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.instructions is None
    # instructions are not inherited
    assert all(m.role != "system" for m in scripted.calls[-1].messages)
    third = await sdk.responses.create(input="third", previous_response_id=second.id)
    assert _turns(scripted) == [
        ("user", "first"),
        ("assistant", "Echo 1: first"),
        ("user", "second"),
        ("assistant", "Echo 2: second"),
        ("user", "third"),
    ]
    assert third.output_text == "Echo 3: third"
    assert third.usage is not None and third.usage.input_tokens_details.cached_tokens > 0
    fork = await sdk.responses.create(input="other", previous_response_id=first.id)
    assert _turns(scripted) == [
        ("user", "first"),
        ("assistant", "Echo 1: first"),
        ("user", "other"),
    ]
    assert fork.output_text == "Echo 2: other"
    # every link of one chain, forks too, shares the backend's prompt state
    assert {c.session for c in scripted.calls[-4:]} == {first.id}


async def test_store_false_is_not_kept(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(input="secret", store=False)
    assert response.output_text == "Echo 1: secret"
    assert response.status == "completed"
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as raised:
        await sdk.responses.create(input="again", previous_response_id=response.id)
    assert raised.value.code == "previous_response_not_found"


async def test_store_false_streams(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/responses", json={"input": "x", "store": False, "stream": True})
    events = sse_events(reply.text)
    assert events[-1][0] == "response.completed"
    assert [b["sequence_number"] for _, b in events] == list(range(len(events)))


async def test_delete(sdk: openai.AsyncOpenAI) -> None:
    first = await sdk.responses.create(input="one")
    second = await sdk.responses.create(input="two", previous_response_id=first.id)
    await sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(first.id)
    # its successor keeps the context it was given
    third = await sdk.responses.create(input="three", previous_response_id=second.id)
    assert third.output_text == "Echo 3: three"


async def test_input_tokens(sdk: openai.AsyncOpenAI, scripted: ScriptedBackend) -> None:
    counted = await sdk.responses.input_tokens.count(model="scripted", input="a b c")
    assert counted.input_tokens == scripted.prompt_tokens([ChatMessage("user", "a b c")])
    first = await sdk.responses.create(input="one")
    chained = await sdk.responses.input_tokens.count(input="two", previous_response_id=first.id)
    expected = [
        ChatMessage("user", "one"),
        ChatMessage("assistant", "Echo 1: one"),
        ChatMessage("user", "two"),
    ]
    assert chained.input_tokens == scripted.prompt_tokens(expected)


async def _error(reply: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return dict(error)


async def test_errors_in_openai_shape(http: httpx.AsyncClient, sdk_for: SdkFactory) -> None:
    await _error(await http.get("/v1/responses/resp_unknown"), 404)
    await _error(await http.post("/v1/responses/resp_unknown/cancel"), 404)
    await _error(await http.get("/v1/responses/resp_unknown/input_items"), 404)
    mine = (await http.post("/v1/responses", json={"input": "mine"})).json()["id"]
    bob = sdk_for("bob")
    with pytest.raises(openai.NotFoundError):
        await bob.responses.retrieve(mine)
    with pytest.raises(openai.NotFoundError):
        await bob.responses.create(input="steal", previous_response_id=mine)
    both = {"input": "x", "previous_response_id": mine, "conversation": "conv_x"}
    error = await _error(await http.post("/v1/responses", json=both), 400)
    assert error["param"] == "previous_response_id"
    image = {"type": "input_image", "image_url": "http://x/y.png"}
    bad_part = {"input": [{"role": "user", "content": [image]}]}
    error = await _error(await http.post("/v1/responses", json=bad_part), 400)
    assert "input_image" in error["message"]
    tool_output = {"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}
    error = await _error(await http.post("/v1/responses", json=tool_output), 400)
    assert "function_call_output" in error["message"]
    tools = {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]}
    await _error(await http.post("/v1/responses", json=tools), 400)
    schema = {"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}}}
    await _error(await http.post("/v1/responses", json=schema), 400)
    await _error(await http.post("/v1/responses", json={"input": 5}), 400)
    await _error(await http.post("/v1/responses", json={"input": "x", "temperature": 9}), 400)
    many = {"input": "x", "metadata": {str(i): "v" for i in range(17)}}
    await _error(await http.post("/v1/responses", json=many), 400)
    unstored = {"input": "x", "conversation": "conv_x", "store": False}
    await _error(await http.post("/v1/responses", json=unstored), 400)
    background = {"input": "x", "background": True, "store": False}
    await _error(await http.post("/v1/responses", json=background), 400)


async def test_truncation_disabled_refuses_what_does_not_fit(
    http: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    long = " ".join(["word"] * 2000)
    first = (await http.post("/v1/responses", json={"input": long})).json()["id"]
    follow = {"input": "more " + long, "previous_response_id": first}
    fitted = await http.post("/v1/responses", json=follow)
    assert fitted.status_code == 200
    # auto: the oldest turns drop out of what the model sees
    sent = scripted.calls[-1].messages
    assert [m.content for m in sent if m.role == "user"] == ["more " + long]
    refused = await http.post("/v1/responses", json={**follow, "truncation": "disabled"})
    await _error(refused, 400, "context_length_exceeded")


async def until(sdk: openai.AsyncOpenAI, rid: str, check: Callable[[Any], bool]) -> Any:
    """Retrieve a response until `check` holds for it."""
    for _ in range(2000):
        response = await sdk.responses.retrieve(rid)
        if check(response):
            return response
        await asyncio.sleep(0.01)
    raise AssertionError("the response never reached the expected state")


async def test_background_then_retrieve(sdk: openai.AsyncOpenAI, scripted: ScriptedBackend) -> None:
    scripted.token_delay = 0.01
    scripted.enqueue("A reply written in the background.")
    started = await sdk.responses.create(input="go", background=True)
    assert started.status in ("queued", "in_progress")
    assert started.background is True
    done = await until(sdk, started.id, lambda r: r.status == "completed")
    assert done.output_text == "A reply written in the background."


async def test_cancel_keeps_partial_text(
    sdk: openai.AsyncOpenAI, scripted: ScriptedBackend
) -> None:
    scripted.token_delay = 0.02
    scripted.enqueue(" ".join(f"w{i}" for i in range(500)))
    started = await sdk.responses.create(input="long", background=True)
    await until(sdk, started.id, lambda r: len(r.output_text) > 0)
    cancelled = await sdk.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    assert cancelled.output_text.startswith("w0")
    assert len(cancelled.output_text.split()) < 500
    stored = await sdk.responses.retrieve(started.id)
    assert stored.status == "cancelled" and stored.output_text == cancelled.output_text


async def test_resume_from_the_log(sdk: openai.AsyncOpenAI, scripted: ScriptedBackend) -> None:
    scripted.enqueue("alpha beta gamma delta")
    started = await sdk.responses.create(input="go", background=True)
    await until(sdk, started.id, lambda r: r.status == "completed")
    events = [
        e async for e in await sdk.responses.retrieve(started.id, stream=True, starting_after=4)
    ]
    assert [e.sequence_number for e in events] == list(range(5, 5 + len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == " beta gamma delta"
    assert events[-1].type == "response.completed"


async def test_a_cancel_written_to_the_store_stops_the_response(
    app: FastAPI, sdk: openai.AsyncOpenAI, scripted: ScriptedBackend
) -> None:
    # What another process does when its notification cannot reach this one.
    scripted.token_delay = 0.02
    scripted.enqueue(" ".join(f"w{i}" for i in range(500)))
    started = await sdk.responses.create(input="long", background=True)
    async with app.state.db.session() as session, session.begin():
        await store.update_response(session, started.id, cancel_requested=True)
    done = await until(sdk, started.id, lambda r: r.status != "in_progress")
    assert done.status == "cancelled"
    assert len(done.output_text.split()) < 500


async def test_a_finished_stream_is_stored_before_its_last_event(
    http: httpx.AsyncClient, sdk: openai.AsyncOpenAI, scripted: ScriptedBackend
) -> None:
    for turn in range(5):
        scripted.enqueue(f"reply number {turn}")
        reply = await http.post("/v1/responses", json={"input": "go", "stream": True})
        name, body = sse_events(reply.text)[-1]
        assert name == "response.completed"
        stored = await sdk.responses.retrieve(body["response"]["id"])
        assert (stored.status, stored.output_text) == ("completed", f"reply number {turn}")
