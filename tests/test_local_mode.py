"""Local mode and the browser: host names, origins, content types, file modes, weak secrets."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from parlour.auth import create_key
from parlour.backends.state_store import StateStore
from parlour.settings import Settings
from parlour.tokens import JwtVerifier
from tests.conftest import running_app

ATTACKER = "attacker.example:8900"


async def _client(app: FastAPI, base_url: str = "http://127.0.0.1:8900") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


@pytest.fixture
async def configured(settings: Settings) -> AsyncIterator[FastAPI]:
    """An app that also serves `parlour.example` and lets `https://ui.example` call it."""
    changed = dataclasses.replace(
        settings, allowed_hosts=("parlour.example",), cors_origins=("https://ui.example",)
    )
    async with running_app(changed) as application:
        yield application


SHAPES: list[tuple[str, str, Callable[[Any], str]]] = [
    ("GET", "/conversations", lambda body: body["detail"]),
    ("GET", "/admin/bots", lambda body: body["detail"]),
    ("GET", "/v1/models", lambda body: body["error"]["message"]),
    ("POST", "/api/kernel2/chat", lambda body: body["message"]),
    ("POST", "/chat", lambda body: body["detail"]),
]


@pytest.mark.parametrize(("method", "path", "message_of"), SHAPES)
async def test_foreign_host_names_are_refused(
    app: FastAPI, method: str, path: str, message_of: Callable[[Any], str]
) -> None:
    async with await _client(app) as client:
        refused = await client.request(method, path, headers={"host": ATTACKER}, json={})
        assert refused.status_code == 403, refused.text
        assert "PARLOUR_ALLOWED_HOSTS" in message_of(refused.json())
        for host in ("localhost:8900", "127.0.0.1", "[::1]:8900", "LOCALHOST"):
            served = await client.get("/conversations", headers={"host": host})
            assert served.status_code == 200, (host, served.text)


async def test_configured_host_names_are_served(configured: FastAPI) -> None:
    async with await _client(configured, "http://parlour.example") as client:
        assert (await client.get("/conversations")).status_code == 200
        assert (await client.get("/conversations", headers={"host": ATTACKER})).status_code == 403


async def test_health_answers_any_host(app: FastAPI) -> None:
    async with await _client(app) as client:
        assert (await client.get("/health", headers={"host": ATTACKER})).status_code == 200


async def test_any_host_is_served_once_auth_is_configured(app: FastAPI) -> None:
    key = await create_key(app.state.db, owner="alice")
    async with await _client(app) as client:
        response = await client.get(
            "/conversations",
            headers={"host": ATTACKER, "authorization": f"Bearer {key.secret}"},
        )
        assert response.status_code == 200, response.text


async def test_cross_site_requests_are_refused(app: FastAPI) -> None:
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    async with await _client(app) as client:
        plain = await client.post(
            "/api/kernel2/chat", content=body, headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 415 and "application/json" in plain.json()["message"]
        form = await client.post(
            "/chat",
            content=b'{"bot_slug": "x", "prompt": "a", "stream": false}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 415 and "application/json" in form.json()["detail"]
        foreign = await client.post(
            "/api/kernel2/chat",
            content=body,
            headers={"content-type": "application/json", "origin": "https://evil.example"},
        )
        assert foreign.status_code == 403 and "PARLOUR_CORS_ORIGINS" in foreign.json()["message"]
        own = await client.post(
            "/api/kernel2/chat",
            content=body,
            headers={"content-type": "application/json", "origin": "http://127.0.0.1:8900"},
        )
        assert own.status_code == 200, own.text
        assert (await client.get("/conversations", headers={"origin": "null"})).status_code == 403


async def test_configured_origins_get_cors(configured: FastAPI) -> None:
    origin = {"origin": "https://ui.example"}
    async with await _client(configured) as client:
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                **origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, x-session-key",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        listed = await client.get("/conversations", headers=origin)
        assert listed.status_code == 200
        assert listed.headers["access-control-allow-origin"] == "https://ui.example"
        other = await client.get("/conversations", headers={"origin": "https://evil.example"})
        assert other.status_code == 403
        assert "access-control-allow-origin" not in other.headers


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_directory_and_database_are_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    async with (
        running_app(Settings(data_dir=data, model="scripted")) as application,
        await _client(application) as client,
    ):
        conversation = {"title": "t", "model_tag": "scripted"}
        assert (await client.post("/conversations", json=conversation)).status_code == 201
    assert _mode(data) == 0o700
    assert _mode(data.parent) == 0o700
    database = data / "parlour.db"
    locks = data / "parlour.db-locks"
    files = [database, *data.glob("parlour.db-*"), *locks.glob("*")]
    files = [f for f in files if f.is_file()]
    assert files and all(_mode(f) == 0o600 for f in files), {f.name: oct(_mode(f)) for f in files}
    assert _mode(locks) == 0o700


def test_state_files_are_private(tmp_path: Path) -> None:
    store = StateStore(ram_bytes=1, disk_bytes=1 << 20, directory=tmp_path / "state")
    store.put("a", [1, 2], b"x" * 64)
    store.put("b", [3], b"y" * 64)
    saved = list((tmp_path / "state").rglob("*.state"))
    assert saved and all(_mode(f) == 0o600 for f in saved)
    assert all(_mode(d) == 0o700 for d in (tmp_path / "state").rglob("*") if d.is_dir())


@pytest.mark.parametrize("secret", ["x", "a" * 31])
def test_weak_hs256_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ValueError, match=r"at least 32.*secrets\.token_urlsafe"):
        JwtVerifier.from_settings(Settings(jwt_secret=secret))
    assert JwtVerifier.from_settings(Settings(jwt_secret="a" * 32)) is not None
