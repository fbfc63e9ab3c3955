"""OpenAI's Conversations API through the official SDK, over parlour's own conversations."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest

from parlour.backends.scripted import ScriptedBackend

from . import test_api_responses as shared
from .test_api_responses import SdkFactory

# The same app, owners and clients as the Responses tests.
settings, http, sdk_for, sdk = shared.settings, shared.http, shared.sdk_for, shared.sdk


def text_of(item: Any) -> str:
    """The text of a message item's first content part."""
    return str(item.content[0].text)


async def test_items_and_responses_on_a_conversation(
    sdk: openai.AsyncOpenAI, http: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    conversation = await sdk.conversations.create(
        items=[
            {"type": "message", "role": "user", "content": "My name is Ada."},
            {"type": "message", "role": "assistant", "content": "Hello Ada."},
        ],
        metadata={"topic": "names"},
    )
    assert conversation.id.startswith("conv_")
    assert conversation.metadata == {"topic": "names"}
    first = await sdk.responses.create(input="What is my name?", conversation=conversation.id)
    assert first.output_text == "Echo 2: What is my name?"
    assert first.conversation is not None and first.conversation.id == conversation.id
    assert [(m.role, m.content) for m in scripted.calls[-1].messages] == [
        ("user", "My name is Ada."),
        ("assistant", "Hello Ada."),
        ("user", "What is my name?"),
    ]
    second = await sdk.responses.create(
        input=[{"role": "user", "content": "And again?"}], conversation={"id": conversation.id}
    )
    assert second.output_text == "Echo 3: And again?"
    # only the new tokens: the session's earlier prompt is reused
    assert second.usage is not None and second.usage.input_tokens_details.cached_tokens > 0

    newest = await sdk.conversations.items.list(conversation.id, limit=4)
    texts = [text_of(item) for item in newest.data]
    assert texts == [
        "Echo 3: And again?",
        "And again?",
        "Echo 2: What is my name?",
        "What is my name?",
    ]
    assert newest.has_more is True
    rest = await sdk.conversations.items.list(conversation.id, limit=4, after=str(newest.last_id))
    assert [text_of(i) for i in rest.data] == ["Hello Ada.", "My name is Ada."]
    assert rest.has_more is False
    oldest = await sdk.conversations.items.list(conversation.id, order="asc", limit=2)
    assert [i.role for i in oldest.data] == ["user", "assistant"]  # type: ignore[union-attr]
    paged = [i.id async for i in sdk.conversations.items.list(conversation.id, limit=2)]
    assert len(paged) == 6 and len(set(paged)) == 6

    # the same conversation in the REST API of conversations
    listed = (await http.get("/conversations")).json()
    cid = str(uuid.UUID(conversation.id.removeprefix("conv_")))
    assert cid in [c["id"] for c in listed]
    messages = (await http.get(f"/conversations/{cid}/messages")).json()
    assert [m["content"] for m in messages][-1] == "Echo 3: And again?"


async def test_a_rest_conversation_is_reachable(
    sdk: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    made = (
        await http.post("/conversations", json={"title": "From REST", "model_tag": "scripted"})
    ).json()
    conv_id = f"conv_{uuid.UUID(made['id']).hex}"
    fetched = await sdk.conversations.retrieve(conv_id)
    assert fetched.id == conv_id
    reply = await sdk.responses.create(input="hello", conversation=conv_id)
    assert reply.output_text == "Echo 1: hello"
    messages = (await http.get(f"/conversations/{made['id']}/messages")).json()
    assert [m["role"] for m in messages] == ["user", "assistant"]


async def test_update_items_and_delete(sdk: openai.AsyncOpenAI, scripted: ScriptedBackend) -> None:
    conversation = await sdk.conversations.create()
    updated = await sdk.conversations.update(conversation.id, metadata={"k": "v"})
    assert updated.metadata == {"k": "v"}
    added = await sdk.conversations.items.create(
        conversation.id,
        items=[
            {"type": "message", "role": "user", "content": "keep"},
            {"type": "message", "role": "user", "content": "drop"},
        ],
    )
    assert len(added.data) == 2
    dropped = str(added.data[1].id)
    item = await sdk.conversations.items.retrieve(dropped, conversation_id=conversation.id)
    assert text_of(item) == "drop"
    await sdk.conversations.items.delete(dropped, conversation_id=conversation.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.conversations.items.retrieve(dropped, conversation_id=conversation.id)
    await sdk.responses.create(input="next", conversation=conversation.id)
    assert [m.content for m in scripted.calls[-1].messages] == ["keep", "next"]
    deleted = await sdk.conversations.delete(conversation.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        await sdk.conversations.retrieve(conversation.id)


async def test_owners_are_isolated(sdk: openai.AsyncOpenAI, sdk_for: SdkFactory) -> None:
    conversation = await sdk.conversations.create(items=[{"role": "user", "content": "private"}])
    bob = sdk_for("bob")
    with pytest.raises(openai.NotFoundError):
        await bob.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        await bob.conversations.items.list(conversation.id)
    with pytest.raises(openai.NotFoundError):
        await bob.responses.create(input="x", conversation=conversation.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.conversations.retrieve("conv_not-an-id")


async def test_bad_requests(http: httpx.AsyncClient) -> None:
    too_many = {"items": [{"role": "user", "content": str(i)} for i in range(21)]}
    reply = await http.post("/v1/conversations", json=too_many)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "items"
    made = (await http.post("/v1/conversations", json={})).json()
    for query in ("limit=0", "limit=101", "order=up", "after=msg_unknown"):
        reply = await http.get(f"/v1/conversations/{made['id']}/items?{query}")
        assert reply.status_code == 400, query
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


async def test_background_stream_on_a_conversation_resumes_and_cancels(
    sdk: openai.AsyncOpenAI, http: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    conversation = await sdk.conversations.create()
    body = {"input": "hi", "conversation": conversation.id, "stream": True, "background": True}
    reply = await http.post("/v1/responses", json=body)
    events = shared.sse_events(reply.text)
    rid = events[0][1]["response"]["id"]
    assert events[-1][0] == "response.completed"
    resumed = [e async for e in await sdk.responses.retrieve(rid, stream=True, starting_after=2)]
    assert [e.sequence_number for e in resumed] == list(range(3, len(events)))

    scripted.token_delay = 0.02
    scripted.enqueue(" ".join(f"w{i}" for i in range(500)))
    started = await sdk.responses.create(
        input="long", conversation=conversation.id, background=True
    )
    await shared.until(sdk, started.id, lambda r: len(r.output_text) > 0)
    cancelled = await sdk.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    items = await sdk.conversations.items.list(conversation.id, limit=1)
    newest = items.data[0]
    assert newest.status == "incomplete"  # type: ignore[union-attr]
    assert text_of(newest) == cancelled.output_text


async def test_a_deleted_item_leaves_the_context_of_later_turns(
    sdk: openai.AsyncOpenAI, scripted: ScriptedBackend
) -> None:
    conversation = await sdk.conversations.create(
        items=[
            {"type": "message", "role": "user", "content": "secret one"},
            {"type": "message", "role": "user", "content": "keep two"},
        ]
    )
    # A turn first, so this process remembers the conversation's history.
    await sdk.responses.create(input="third", conversation=conversation.id)
    assert "secret one" in [m.content for m in scripted.calls[-1].messages]
    items = await sdk.conversations.items.list(conversation.id, order="asc")
    secret = next(str(i.id) for i in items.data if text_of(i) == "secret one")
    await sdk.conversations.items.delete(secret, conversation_id=conversation.id)
    await sdk.responses.create(input="fourth", conversation=conversation.id)
    seen = [m.content for m in scripted.calls[-1].messages]
    assert "secret one" not in seen
    assert seen[0] == "keep two" and seen[-1] == "fourth"
