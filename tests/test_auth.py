"""Authentication on the real app: JWT verification and its attacks, API keys, open mode."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from sqlalchemy import select

from parlour.api.health import HEALTH_PATHS
from parlour.app import create_app
from parlour.auth import create_key, generate_key, hash_key, list_keys, revoke_key
from parlour.settings import Settings
from parlour.store import queries
from parlour.store.db import Database
from parlour.store.tables import ApiKey, Conversation, Owner, utcnow
from tests.support.auth import (
    AUDIENCE,
    ISSUER,
    SECRET,
    bearer,
    claims,
    ec_private_key,
    hmac_forgery,
    hs256,
    rsa_private_key,
    signed,
    unsigned,
    with_flipped_signature,
    with_payload,
    write_public_pem,
)


@dataclass
class Running:
    """An app with its lifespan running and a client talking to it."""

    app: FastAPI
    client: httpx.AsyncClient


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start apps on fresh SQLite files with the given settings; all stop at the end."""
    async with AsyncExitStack() as stack:
        count = 0

        async def starter(**overrides: Any) -> Running:
            nonlocal count
            count += 1
            data_dir = overrides.pop("data_dir", tmp_path / f"data{count}")
            app = create_app(Settings(data_dir=data_dir, model="scripted", **overrides))
            await stack.enter_async_context(app.router.lifespan_context(app))
            await app.state.models.wait_loaded()
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://localhost"
                )
            )
            return Running(app, client)

        yield starter


@dataclass(frozen=True)
class KeyPair:
    """A private key and the file holding its public half."""

    private: Any
    public_pem: bytes
    path: Path


@pytest.fixture(scope="module")
def rsa_pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """An RSA key whose public half is in a PEM file."""
    key = rsa_private_key()
    path = tmp_path_factory.mktemp("keys") / "rsa.pem"
    return KeyPair(key, write_public_pem(key, path), path)


@pytest.fixture(scope="module")
def ec_pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A P-256 key whose public half is in a PEM file."""
    key = ec_private_key()
    path = tmp_path_factory.mktemp("keys") / "ec.pem"
    return KeyPair(key, write_public_pem(key, path), path)


async def assert_unauthorized(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    """Both dialects answer 401 in their own shape with WWW-Authenticate; returns the detail."""
    rest = await client.get("/conversations", headers=headers)
    assert rest.status_code == 401, rest.text
    assert rest.headers["www-authenticate"] == "Bearer"
    detail = rest.json()["detail"]
    assert isinstance(detail, str) and detail
    openai = await client.get("/v1/models", headers=headers)
    assert openai.status_code == 401, openai.text
    assert openai.headers["www-authenticate"] == "Bearer"
    error = openai.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    return detail


async def assert_authorized(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """The token is accepted by both dialects."""
    rest = await client.get("/conversations", headers=headers)
    assert rest.status_code == 200, rest.text
    openai = await client.get("/v1/models", headers=headers)
    assert openai.status_code == 200, openai.text


# --- JWT -------------------------------------------------------------------------------


async def test_hs256_token_accepted_and_missing_token_refused(start: Start) -> None:
    server = await start(jwt_secret=SECRET)
    await assert_authorized(server.client, bearer(hs256()))
    detail = await assert_unauthorized(server.client, {})
    assert "parlour key create" in detail and "parlour token" in detail
    await assert_unauthorized(server.client, {"Authorization": f"Basic {hs256()}"})
    await assert_unauthorized(server.client, {"Authorization": "Bearer"})
    health = await server.client.get("/health")
    assert health.status_code == 200


async def test_rs256_and_es256_tokens_accepted(
    start: Start, rsa_pair: KeyPair, ec_pair: KeyPair
) -> None:
    rs = await start(jwt_public_key=rsa_pair.path)
    await assert_authorized(rs.client, bearer(signed(rsa_pair.private, "RS256")))
    es = await start(jwt_public_key=ec_pair.path)
    await assert_authorized(es.client, bearer(signed(ec_pair.private, "ES256")))
    # Each server knows only its own key family.
    await assert_unauthorized(rs.client, bearer(signed(ec_pair.private, "ES256")))
    await assert_unauthorized(es.client, bearer(signed(rsa_pair.private, "RS256")))


def _attacks(pair: KeyPair) -> dict[str, str]:
    good = claims(iss=ISSUER, aud=AUDIENCE)
    valid = signed(pair.private, "RS256", iss=ISSUER, aud=AUDIENCE)
    return {
        "alg none": unsigned(good),
        "alg None": unsigned(good, alg="None"),
        "alg none with a signature": unsigned(good)[:-1] + ".c2lnbmF0dXJl",
        "HS256 signed with the public key": hmac_forgery(good, pair.public_pem),
        "HS256 signed with the public key, trimmed": hmac_forgery(good, pair.public_pem.strip()),
        "expired": signed(pair.private, "RS256", iss=ISSUER, aud=AUDIENCE, ttl=-3600),
        "not yet valid": signed(
            pair.private, "RS256", iss=ISSUER, aud=AUDIENCE, nbf=int(time.time()) + 3600
        ),
        "wrong audience": signed(pair.private, "RS256", iss=ISSUER, aud="someone-else"),
        "no audience": signed(pair.private, "RS256", iss=ISSUER),
        "wrong issuer": signed(pair.private, "RS256", iss="https://evil.test", aud=AUDIENCE),
        "no issuer": signed(pair.private, "RS256", aud=AUDIENCE),
        "tampered payload": with_payload(valid, {**good, "sub": "mallory"}),
        "tampered signature": with_flipped_signature(valid),
        "unknown key": signed(rsa_private_key(), "RS256", iss=ISSUER, aud=AUDIENCE),
        "no exp": signed(pair.private, "RS256", iss=ISSUER, aud=AUDIENCE, exp=None),
        "no sub": jwt_without_sub(pair),
        "garbage": "garbage",
        "three garbage segments": "a.b.c",
        "header only": valid.split(".")[0],
        "HS256 with some secret": hs256(iss=ISSUER, aud=AUDIENCE),
    }


def jwt_without_sub(pair: KeyPair) -> str:
    """A well-signed token that names no subject."""
    import jwt

    payload = claims(iss=ISSUER, aud=AUDIENCE)
    del payload["sub"]
    return jwt.encode(payload, pair.private, algorithm="RS256")


async def test_jwt_attacks_are_refused(start: Start, rsa_pair: KeyPair) -> None:
    server = await start(jwt_public_key=rsa_pair.path, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    # The same key, issuer and audience work, so each refusal below is the attack's doing.
    valid = signed(rsa_pair.private, "RS256", iss=ISSUER, aud=AUDIENCE)
    await assert_authorized(server.client, bearer(valid))
    for name, token in _attacks(rsa_pair).items():
        response = await server.client.get("/conversations", headers=bearer(token))
        assert response.status_code == 401, f"{name}: {response.text}"
        assert response.headers["www-authenticate"] == "Bearer", name
    owners = await server.client.get("/conversations", headers=bearer(valid))
    assert owners.status_code == 200


async def test_hs256_forged_with_public_key_refused_when_both_keys_configured(
    start: Start, rsa_pair: KeyPair
) -> None:
    server = await start(jwt_secret=SECRET, jwt_public_key=rsa_pair.path)
    await assert_authorized(server.client, bearer(hs256()))
    await assert_authorized(server.client, bearer(signed(rsa_pair.private, "RS256")))
    forged = hmac_forgery(claims(), rsa_pair.public_pem)
    detail = await assert_unauthorized(server.client, bearer(forged))
    assert "signature" in detail


async def test_rs256_token_refused_by_hs256_server(start: Start, rsa_pair: KeyPair) -> None:
    server = await start(jwt_secret=SECRET)
    detail = await assert_unauthorized(server.client, bearer(signed(rsa_pair.private, "RS256")))
    assert "RS256" in detail and "HS256" in detail


async def test_attack_messages_say_what_is_wrong(start: Start) -> None:
    server = await start(jwt_secret=SECRET, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    cases = {
        "expired": hs256(iss=ISSUER, aud=AUDIENCE, ttl=-3600),
        "not valid yet": hs256(iss=ISSUER, aud=AUDIENCE, nbf=int(time.time()) + 3600),
        "PARLOUR_JWT_AUDIENCE": hs256(iss=ISSUER, aud="other"),
        "PARLOUR_JWT_ISSUER": hs256(iss="https://evil.test", aud=AUDIENCE),
        "'exp'": hs256(iss=ISSUER, aud=AUDIENCE, exp=None),
        "signature": hs256(iss=ISSUER, aud=AUDIENCE, secret="another-secret-of-more-than-32-bytes"),
        "neither an API key nor a JWT": "garbage",
        "'none'": unsigned(claims(iss=ISSUER, aud=AUDIENCE)),
    }
    for expected, token in cases.items():
        detail = await assert_unauthorized(server.client, bearer(token))
        assert expected in detail, (expected, detail)


async def test_nbf_in_the_past_is_fine(start: Start) -> None:
    server = await start(jwt_secret=SECRET)
    await assert_authorized(server.client, bearer(hs256(nbf=int(time.time()) - 60)))


async def test_unusable_public_key_fails_startup(start: Start, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a PEM public key"):
        await start(jwt_public_key=bad)
    with pytest.raises(ValueError, match="Cannot read"):
        await start(jwt_public_key=tmp_path / "missing.pem")
    p384 = tmp_path / "p384.pem"
    write_public_pem(ec.generate_private_key(ec.SECP384R1()), p384)
    with pytest.raises(ValueError, match="P-256"):
        await start(jwt_public_key=p384)


async def test_jwt_subjects_are_owners(start: Start) -> None:
    server = await start(jwt_secret=SECRET)
    client = server.client
    alice, bob = bearer(hs256("alice")), bearer(hs256("bob"))
    made = await client.post(
        "/conversations", headers=alice, json={"title": "mine", "model_tag": "scripted"}
    )
    assert made.status_code == 201
    bob_list = await client.get("/conversations", headers=bob)
    assert bob_list.json() == []
    again = await client.get("/conversations", headers=bearer(hs256("alice")))
    assert [c["id"] for c in again.json()] == [made.json()["id"]]
    assert made.json()["user_id"] == str(await server.app.state.engine.owner_id("alice"))


async def test_session_keys_are_per_owner(start: Start) -> None:
    server = await start(jwt_secret=SECRET)
    client = server.client

    async def say(token: str, text: str) -> str:
        response = await client.post(
            "/v1/chat/completions",
            headers={**bearer(token), "x-session-key": "wx:dm:shared"},
            json={"messages": [{"role": "user", "content": text}]},
        )
        assert response.status_code == 200, response.text
        content: str = response.json()["choices"][0]["message"]["content"]
        return content

    assert await say(hs256("alice"), "hi from alice") == "Echo 1: hi from alice"
    assert await say(hs256("bob"), "hi from bob") == "Echo 1: hi from bob"
    assert await say(hs256("alice"), "again") == "Echo 2: again"
    alice = (await client.get("/conversations", headers=bearer(hs256("alice")))).json()
    bob = (await client.get("/conversations", headers=bearer(hs256("bob")))).json()
    assert len(alice) == 1 and len(bob) == 1 and alice[0]["id"] != bob[0]["id"]


# --- every route ----------------------------------------------------------------------


def _operations(app: FastAPI) -> list[tuple[str, str]]:
    spec = app.openapi()
    return [
        (method.upper(), path.replace("{conversationId}", str(uuid.uuid4())))
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]


async def test_every_route_but_health_requires_auth(start: Start) -> None:
    server = await start(jwt_secret=SECRET)
    operations = _operations(server.app)
    assert ("GET", "/health") in operations
    assert len(operations) >= 9
    for method, path in operations:
        # Any remaining template ({uid}, {name}, …) is filled with a plain value.
        concrete = path.replace("{", "").replace("}", "")
        response = await server.client.request(method, concrete, json={})
        if path in HEALTH_PATHS:
            assert response.status_code == 200, response.text
            continue
        assert response.status_code == 401, f"{method} {path}: {response.text}"
        assert response.headers["www-authenticate"] == "Bearer", f"{method} {path}"


async def test_openapi_documents_bearer_auth(start: Start) -> None:
    server = await start(jwt_secret=SECRET)
    spec = (await server.client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if path in HEALTH_PATHS:
                assert operation["security"] == []
            else:
                assert operation["security"] == [{"bearerAuth": []}], (method, path)
                assert "401" in operation["responses"], (method, path)


# --- API keys -------------------------------------------------------------------------


async def test_api_key_lifecycle(start: Start) -> None:
    server = await start()
    db = server.app.state.db
    client = server.client
    # No auth configured yet: the local owner, whatever token a client sends.
    assert (await client.get("/conversations")).status_code == 200
    assert (await client.get("/conversations", headers=bearer("unused"))).status_code == 200

    alice = await create_key(db, owner="alice")
    admin = await create_key(db, owner="root", admin=True)
    assert alice.secret.startswith("plr_") and alice.secret != admin.secret
    # A key now exists, so every request needs a token.
    await assert_unauthorized(client, {})
    await assert_authorized(client, bearer(alice.secret))
    detail = await assert_unauthorized(client, bearer(hs256()))
    assert "only API keys" in detail
    altered = alice.secret[:-1] + ("y" if alice.secret.endswith("x") else "x")
    await assert_unauthorized(client, bearer(altered))
    await assert_unauthorized(client, bearer("plr_000000000000_" + "a" * 43))

    principal = await server.app.state.auth.principal(f"Bearer {admin.secret}")
    assert principal.admin and principal.name == "root"
    assert not (await server.app.state.auth.principal(f"Bearer {alice.secret}")).admin

    listed = {k.id: k for k in await list_keys(db)}
    assert listed[alice.info.id].last_used_at is not None
    assert listed[alice.info.id].owner == "alice" and listed[admin.info.id].admin

    await revoke_key(db, str(alice.info.id))
    detail = await assert_unauthorized(client, bearer(alice.secret))
    assert "revoked" in detail
    await assert_authorized(client, bearer(admin.secret))

    # Revoking the last key on loopback returns the server to the local owner.
    await revoke_key(db, admin.info.prefix)
    assert (await client.get("/conversations")).status_code == 200


async def test_a_key_made_by_another_process_acts_for_its_owner_at_once(start: Start) -> None:
    server = await start()
    # Open: the server remembers for a moment that no key exists.
    assert (await server.client.get("/conversations")).status_code == 200
    # Another process (here: its own Database on the same file) adds a key meanwhile.
    other = Database(server.app.state.settings.resolved_database_url)
    prefix, secret = generate_key()
    try:
        async with other.session() as session, session.begin():
            alice = await queries.ensure_owner(session, "alice")
            session.add(
                ApiKey(
                    owner_id=alice.id,
                    prefix=prefix,
                    secret_hash=hash_key(secret),
                    created_at=utcnow(),
                )
            )
    finally:
        await other.close()
    created = await server.client.post(
        "/conversations", headers=bearer(secret), json={"title": "mine", "model_tag": "scripted"}
    )
    assert created.status_code == 201, created.text
    async with server.app.state.db.read() as session:
        owner = await session.scalar(
            select(Owner.name)
            .join(Conversation, Conversation.owner_id == Owner.id)
            .where(Conversation.id == uuid.UUID(created.json()["id"]))
        )
    assert owner == "alice"


async def test_keys_and_jwts_together(start: Start) -> None:
    server = await start(jwt_secret=SECRET)
    key = await create_key(server.app.state.db, owner="alice")
    by_key = await server.client.post(
        "/conversations", headers=bearer(key.secret), json={"title": "k", "model_tag": "scripted"}
    )
    assert by_key.status_code == 201
    by_jwt = await server.client.get("/conversations", headers=bearer(hs256("alice")))
    # A key's owner and a JWT subject of the same name are the same owner.
    assert [c["id"] for c in by_jwt.json()] == [by_key.json()["id"]]


async def test_keys_are_stored_hashed(start: Start) -> None:
    server = await start()
    key = await create_key(server.app.state.db, owner="alice")
    raw = (server.app.state.settings.data_dir / "parlour.db").read_bytes()
    assert key.secret.encode() not in raw
    secret_part = key.secret.rsplit("_", 1)[1]
    assert secret_part.encode() not in raw


async def test_no_auth_beyond_loopback_fails_closed(start: Start) -> None:
    closed = await start(host="0.0.0.0")
    detail = await assert_unauthorized(closed.client, {})
    assert "PARLOUR_JWT_SECRET" in detail
    insecure = await start(host="0.0.0.0", insecure=True)
    assert (await insecure.client.get("/conversations")).status_code == 200
    secured = await start(host="0.0.0.0", jwt_secret=SECRET)
    await assert_authorized(secured.client, bearer(hs256()))
    await assert_unauthorized(secured.client, {})
