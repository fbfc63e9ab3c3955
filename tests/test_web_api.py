"""The chat page's files, headers and small API, in-process (the browser tests drive the page)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI

from parlour import bots
from parlour.app import create_app
from parlour.backends.scripted import ScriptedBackend
from parlour.settings import Settings
from tests.support.auth import SECRET, hs256


async def test_page_and_assets_are_served_with_a_strict_policy(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["script-src"] == "'self'"
    assert directives["default-src"] == "'none'"
    assert "unsafe" not in policy and "http" not in policy
    assert '<script src="/ui/app.js"' in page.text
    assert "<script>" not in page.text

    script = await client.get("/ui/app.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert script.headers["x-content-type-options"] == "nosniff"
    missing_files = ("/ui/nope.js", "/ui/../api/web.py", "/ui/vendor/marked/LICENSE")
    for missing in (*missing_files, "/ui/index.html"):
        assert (await client.get(missing)).status_code == 404, missing


async def test_docs_use_only_local_files(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "/ui/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text
    assert "http" not in docs.text.replace('href="/', "")
    policy = dict(
        d.strip().split(" ", 1) for d in docs.headers["content-security-policy"].split(";")
    )
    assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    for asset in ("/ui/vendor/swagger-ui/swagger-ui-bundle.js", "/ui/docs.js"):
        assert (await client.get(asset)).status_code == 200
    assert (await client.get("/redoc")).status_code == 404


async def auth_app(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(data_dir=tmp_path / "auth", model="scripted", jwt_secret=SECRET)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c


async def test_with_auth_the_page_is_public_and_its_api_is_not(tmp_path: Path) -> None:
    async for client in auth_app(tmp_path):
        for public in ("/", "/docs", "/ui/app.js", "/ui/vendor/swagger-ui/swagger-ui.css"):
            assert (await client.get(public)).status_code == 200, public
        state = await client.get(f"/ui/api/conversations/{uuid.uuid4()}")
        assert state.status_code == 401
        assert (await client.get("/ui/nope.js")).status_code == 401
        headers = {"Authorization": f"Bearer {hs256('alice')}"}
        made = await client.post(
            "/ui/api/conversations", json={"model_tag": "scripted"}, headers=headers
        )
        assert made.status_code == 201, made.text
        state = await client.get(f"/ui/api/conversations/{made.json()['id']}", headers=headers)
        assert state.status_code == 200
        other = {"Authorization": f"Bearer {hs256('bob')}"}
        theirs = await client.get(f"/ui/api/conversations/{made.json()['id']}", headers=other)
        assert theirs.status_code == 404


async def test_new_chat_with_a_bot_and_a_system_prompt(
    app: FastAPI, client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    async with app.state.engine.db.session() as session, session.begin():
        await bots.create_bot(
            session, {"name": "Pirate", "slug": "pirate", "system_prompt": "Talk like a pirate."}
        )
    bad = await client.post("/ui/api/conversations", json={"model_tag": "nope"})
    assert bad.status_code == 422
    bad = await client.post("/ui/api/conversations", json={"model_tag": "scripted", "bot": "x"})
    assert bad.status_code == 404
    made = await client.post(
        "/ui/api/conversations",
        json={"model_tag": "scripted", "bot": "pirate", "system_prompt": "Be brief."},
    )
    assert made.status_code == 201, made.text
    conversation = made.json()
    assert conversation["title"] == "New conversation"
    state = (await client.get(f"/ui/api/conversations/{conversation['id']}")).json()
    assert state["bot"] == "Pirate" and state["system_prompt"] == "Be brief."
    assert state["context_length"] == 4096
    # "Talk like a pirate.\n\nBe brief." is six scripted tokens.
    assert state["system_tokens"] == 6
    assert state["unfinished"] == {}

    r = await client.post(
        f"/conversations/{conversation['id']}/messages",
        json={"message": {"role": "user", "content": "Ahoy"}, "stream": False},
    )
    assert r.status_code == 200, r.text
    assert scripted.calls[-1].messages[0].content == "Talk like a pirate.\n\nBe brief."

    put = await client.put(
        f"/ui/api/conversations/{conversation['id']}/system-prompt",
        json={"system_prompt": "Rhyme."},
    )
    assert put.status_code == 200 and put.json()["system_prompt"] == "Rhyme."
    # The page sends through the Responses API, naming the conversation as conv_<hex>.
    r = await client.post(
        "/v1/responses",
        json={
            "model": "scripted",
            "input": "Again",
            "conversation": "conv_" + uuid.UUID(conversation["id"]).hex,
        },
    )
    assert r.status_code == 200, r.text
    assert scripted.calls[-1].messages[0].content == "Talk like a pirate.\n\nRhyme."
    put = await client.put(
        f"/ui/api/conversations/{uuid.uuid4()}/system-prompt", json={"system_prompt": ""}
    )
    assert put.status_code == 404
