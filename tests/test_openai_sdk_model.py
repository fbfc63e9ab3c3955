"""The official `openai` SDK against a real server with the real embedded model."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .conftest import ServerProcess

pytestmark = pytest.mark.model

EMBEDDED = "smollm2-135m-instruct"


def sdk_client(server: ServerProcess, session_key: str) -> openai.OpenAI:
    """A sync OpenAI client whose every request carries the session key."""
    return openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key="not-needed-on-loopback",
        default_headers={"x-session-key": session_key},
        max_retries=0,
        timeout=120,
    )


@pytest.fixture
def sdk(model_server: ServerProcess, request: pytest.FixtureRequest) -> Iterator[openai.OpenAI]:
    """A client on a session named after the test."""
    with sdk_client(model_server, f"sdk:{request.node.name}") as client:
        yield client


def stored_assistant_replies(server: ServerProcess, session_key: str) -> list[str]:
    """The persisted assistant messages of a session, oldest first."""
    rows = server.rows(
        "SELECT m.content FROM messages m JOIN conversations c ON c.id = m.conversation_id "
        "WHERE c.session_key = ? AND m.role = 'assistant' ORDER BY m.position",
        session_key,
    )
    return [str(row["content"]) for row in rows]


def test_non_streamed_turns(sdk: openai.OpenAI, model_server: ServerProcess) -> None:
    first = sdk.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": "Name a colour of the sky."}],
        max_tokens=24,
        temperature=0,
    )
    assert first.object == "chat.completion"
    assert first.model == EMBEDDED
    text = first.choices[0].message.content
    assert text is not None and text.strip()
    assert first.choices[0].finish_reason in ("stop", "length")
    usage = first.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    second = sdk.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": "And the colour of grass?"}],
        max_tokens=24,
        temperature=0,
    )
    assert second.usage is not None
    # Turn 1's question and answer are now part of the prompt.
    assert second.usage.prompt_tokens > usage.prompt_tokens + usage.completion_tokens
    assert stored_assistant_replies(model_server, "sdk:test_non_streamed_turns") == [
        text,
        second.choices[0].message.content,
    ]


def test_streamed_turns(sdk: openai.OpenAI, model_server: ServerProcess) -> None:
    prompt_tokens: list[int] = []
    completion_tokens: list[int] = []
    replies: list[str] = []
    for question in ("Say hello in French.", "Now say it in Spanish."):
        stream = sdk.chat.completions.create(
            model=EMBEDDED,
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        finishes: list[str] = []
        usages = []
        roles: list[str] = []
        for event in stream:
            assert event.object == "chat.completion.chunk"
            assert event.model == EMBEDDED
            if event.usage is not None:
                assert event.choices == []
                usages.append(event.usage)
                continue
            delta = event.choices[0].delta
            if delta.role:
                roles.append(delta.role)
            if delta.content:
                pieces.append(delta.content)
            if event.choices[0].finish_reason:
                finishes.append(event.choices[0].finish_reason)
        assert roles == ["assistant"]
        assert len(finishes) == 1 and finishes[0] in ("stop", "length")
        assert "".join(pieces).strip()
        assert len(usages) == 1
        usage = usages[0]
        assert usage.prompt_tokens > 0
        assert 0 < usage.completion_tokens <= 24
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        prompt_tokens.append(usage.prompt_tokens)
        completion_tokens.append(usage.completion_tokens)
        replies.append("".join(pieces))
    assert prompt_tokens[1] > prompt_tokens[0] + completion_tokens[0]
    assert stored_assistant_replies(model_server, "sdk:test_streamed_turns") == replies


def test_list_models(sdk: openai.OpenAI) -> None:
    ids = [model.id for model in sdk.models.list()]
    assert EMBEDDED in ids


def test_new_session_takes_the_history_it_is_sent(model_server: ServerProcess) -> None:
    ada: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ]
    with sdk_client(model_server, "sdk:ada") as client:
        whole = client.chat.completions.create(model=EMBEDDED, messages=ada, max_tokens=8)
    with sdk_client(model_server, "sdk:ada-last-only") as client:
        last = client.chat.completions.create(model=EMBEDDED, messages=ada[2:], max_tokens=8)
    assert whole.usage is not None and last.usage is not None
    # The model read all three messages, not only the last one.
    assert whole.usage.prompt_tokens > last.usage.prompt_tokens + 10
    rows = model_server.rows(
        "SELECT m.role, m.content FROM messages m JOIN conversations c "
        "ON c.id = m.conversation_id WHERE c.session_key = ? ORDER BY m.position",
        "sdk:ada",
    )
    assert [(r["role"], r["content"]) for r in rows][:3] == [(m["role"], m["content"]) for m in ada]
    assert len(rows) == 4
