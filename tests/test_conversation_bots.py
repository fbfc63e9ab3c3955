"""A stored conversation with a bot: every turn applies the bot, whichever dialect asks."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from parlour import bots
from parlour.backends.scripted import ScriptedBackend
from parlour.store.tables import Conversation
from parlour.turns.engine import Engine
from parlour.turns.request import BotRef

URL = "/v1/chat/completions"


async def make_bot(engine: Engine, **values: object) -> bots.BotView:
    async with engine.db.session() as session, session.begin():
        return await bots.create_bot(session, {"name": "Pirate", **values})


async def test_bot_prompt_comes_first_and_its_settings_win(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    engine: Engine = app.state.engine
    view = await make_bot(
        engine, slug="pirate", system_prompt="Talk like a pirate.", temperature=1.5
    )
    owner = app.state.local_principal.owner_id
    conversation = await engine.session_conversation(
        owner_id=owner, session_key="ship", bot=BotRef(str(view.bot.uid), by="uid")
    )
    assert conversation.bot_id == view.bot.uid

    r = await client.post(
        URL,
        headers={"x-session-key": "ship"},
        json={
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Ahoy"},
            ],
            "temperature": 0.2,
            "max_tokens": 40,
        },
    )
    assert r.status_code == 200, r.text
    call = scripted.calls[-1]
    assert [(m.role, m.content) for m in call.messages] == [
        ("system", "Talk like a pirate.\n\nBe brief."),
        ("user", "Ahoy"),
    ]
    # The bot sets the temperature; it has no max_tokens, so the request's applies.
    assert call.params.temperature == 1.5
    assert call.params.max_tokens == 40

    # Opening the session again with another bot switches the conversation to it.
    other = await make_bot(engine, slug="poet", system_prompt="Answer in verse.")
    again = await engine.session_conversation(
        owner_id=owner, session_key="ship", bot=BotRef(str(other.bot.uid), by="uid")
    )
    assert again.id == conversation.id
    await client.post(
        f"/conversations/{conversation.id}/messages",
        json={"message": {"role": "user", "content": "Sing"}, "stream": False},
    )
    assert scripted.calls[-1].messages[0].content == "Answer in verse.\n\nBe brief."


async def test_deleting_the_bot_leaves_its_conversations_working(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    engine: Engine = app.state.engine
    view = await make_bot(engine, slug="pirate", system_prompt="Talk like a pirate.")
    owner = app.state.local_principal.owner_id
    conversation = await engine.session_conversation(
        owner_id=owner, session_key="ship", bot=BotRef(str(view.bot.uid), by="uid")
    )
    async with engine.db.session() as session, session.begin():
        await bots.remove_bot(session, await bots.get_bot(session, "pirate"))
    async with engine.db.read() as session, session.begin():
        stored = await session.scalar(
            select(Conversation).where(Conversation.id == conversation.id)
        )
    assert stored is not None and stored.bot_id is None

    r = await client.post(
        URL,
        headers={"x-session-key": "ship"},
        json={"messages": [{"role": "user", "content": "Still here?"}]},
    )
    assert r.json()["choices"][0]["message"]["content"] == "Echo 1: Still here?"
    assert [m.role for m in scripted.calls[-1].messages] == ["user"]
