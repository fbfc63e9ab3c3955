"""OpenAI clients that send no x-session-key: `session_id`, `user`, and the stateless mode,
driven through the official `openai` SDK."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy import func, select

from parlour.app import create_app
from parlour.backends.scripted import ScriptedBackend
from parlour.settings import Settings
from parlour.store.tables import Conversation, Message, Usage

Messages = list[ChatCompletionMessageParam]
ADA: Messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "My name is Ada."},
    {"role": "assistant", "content": "Nice to meet you, Ada!"},
    {"role": "user", "content": "What is my name?"},
]


@asynccontextmanager
async def sdk_for(settings: Settings) -> AsyncIterator[tuple[FastAPI, openai.AsyncOpenAI]]:
    """An app built from these settings and the official client with no session header."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.models.wait_loaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            yield (
                app,
                openai.AsyncOpenAI(
                    base_url="http://localhost/v1",
                    api_key="unused",
                    http_client=http,  # type: ignore[arg-type]
                    max_retries=0,
                ),
            )


def backend(app: FastAPI) -> ScriptedBackend:
    """The app's scripted model."""
    found = app.state.models.default.backend
    assert isinstance(found, ScriptedBackend)
    return found


def sent(app: FastAPI) -> list[tuple[str, str]]:
    """(role, content) of what the model was given last."""
    return [(m.role, m.content) for m in backend(app).calls[-1].messages]


async def count(app: FastAPI, table: Any) -> int:
    """Rows in a table."""
    async with app.state.db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def test_no_session_is_400_saying_how_to_send_one(settings: Settings) -> None:
    async with sdk_for(settings) as (app, sdk):
        with pytest.raises(openai.BadRequestError) as raised:
            await sdk.chat.completions.create(model="scripted", messages=ADA)
        assert raised.value.code == "missing_session_key"
        assert raised.value.param == "x-session-key"
        message = str(raised.value)
        assert "x-session-key" in message and "session_id" in message
        assert "PARLOUR_SESSIONLESS=stateless" in message
        assert backend(app).calls == []


async def test_session_id_in_the_body_is_a_remembered_session(settings: Settings) -> None:
    async with sdk_for(settings) as (app, sdk):
        first = await sdk.chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": "I like tea."}],
            extra_body={"session_id": "webui:42"},
        )
        second = await sdk.chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": "What do I like?"}],
            extra_body={"session_id": "webui:42"},
        )
        assert second.choices[0].message.content == "Echo 2: What do I like?"
        assert sent(app) == [
            ("user", "I like tea."),
            ("assistant", first.choices[0].message.content),
            ("user", "What do I like?"),
        ]
        async with app.state.db.session() as session:
            keys = list(await session.scalars(select(Conversation.session_key)))
        assert keys == ["webui:42"]
        assert await count(app, Message) == 4


async def test_the_header_wins_over_session_id(settings: Settings) -> None:
    async with sdk_for(settings) as (app, sdk):
        await sdk.chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-session-key": "from-header"},
            extra_body={"session_id": "from-body"},
        )
        async with app.state.db.session() as session:
            keys = list(await session.scalars(select(Conversation.session_key)))
        assert keys == ["from-header"]


async def test_invalid_session_id_is_400_naming_it(settings: Settings) -> None:
    async with sdk_for(settings) as (_app, sdk):
        with pytest.raises(openai.BadRequestError) as raised:
            await sdk.chat.completions.create(
                model="scripted", messages=ADA, extra_body={"session_id": "x" * 257}
            )
        assert (raised.value.code, raised.value.param) == ("invalid_session_key", "session_id")


async def test_user_field_carries_the_session_only_when_enabled(settings: Settings) -> None:
    ask: Messages = [{"role": "user", "content": "hi"}]
    async with sdk_for(settings) as (_app, sdk):
        with pytest.raises(openai.BadRequestError):
            await sdk.chat.completions.create(model="scripted", messages=ask, user="alice")
    enabled = dataclasses.replace(settings, session_from_user=True)
    async with sdk_for(enabled) as (app, sdk):
        await sdk.chat.completions.create(model="scripted", messages=ask, user="alice")
        await sdk.chat.completions.create(model="scripted", messages=ask, user="alice")
        assert len(sent(app)) == 3  # the second turn saw the first
        async with app.state.db.session() as session:
            keys = list(await session.scalars(select(Conversation.session_key)))
        assert keys == ["alice"]


async def test_stateless_mode_uses_the_whole_history_and_stores_only_usage(
    settings: Settings,
) -> None:
    stateless = dataclasses.replace(settings, sessionless="stateless")
    async with sdk_for(stateless) as (app, sdk):
        completion = await sdk.chat.completions.create(model="scripted", messages=ADA)
        assert sent(app) == [(m["role"], m["content"]) for m in ADA]
        assert completion.choices[0].message.content == "Echo 2: What is my name?"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == backend(app).prompt_tokens(
            backend(app).calls[-1].messages
        )
        pieces = [
            chunk.choices[0].delta.content or ""
            async for chunk in await sdk.chat.completions.create(
                model="scripted", messages=ADA[1:2], stream=True
            )
            if chunk.choices
        ]
        assert "".join(pieces) == "Echo 1: My name is Ada."
        assert sent(app) == [("user", "My name is Ada.")]
        assert await count(app, Conversation) == 0
        assert await count(app, Message) == 0
        assert await count(app, Usage) == 2
        # A session, when the client sends one, still works as before.
        await sdk.chat.completions.create(
            model="scripted", messages=ADA[1:2], extra_body={"session_id": "kept"}
        )
        assert await count(app, Message) == 2


async def test_stateless_mode_still_needs_a_user_message_last(settings: Settings) -> None:
    stateless = dataclasses.replace(settings, sessionless="stateless")
    async with sdk_for(stateless) as (app, sdk):
        with pytest.raises(openai.BadRequestError) as raised:
            await sdk.chat.completions.create(model="scripted", messages=ADA[:3])
        assert raised.value.param == "messages"
        assert backend(app).calls == []


def test_sessionless_setting_is_checked() -> None:
    assert Settings.from_env({"PARLOUR_SESSIONLESS": "Stateless"}).sessionless == "stateless"
    assert Settings.from_env({"PARLOUR_SESSION_FROM_USER": "true"}).session_from_user
    with pytest.raises(ValueError, match="PARLOUR_SESSIONLESS must be one of reject, stateless"):
        Settings.from_env({"PARLOUR_SESSIONLESS": "sometimes"})
