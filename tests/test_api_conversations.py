"""The conversations REST API on the real app with JWT auth and a SQLite file."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from parlour.app import create_app
from parlour.backends.base import ChatMessage, Chunk, GenerationParams
from parlour.backends.scripted import ScriptedBackend
from parlour.errors import BackendError
from parlour.models import LoadedModel, ModelRegistry, ModelSpec
from parlour.settings import Settings
from parlour.store.tables import Message
from tests.support.auth import SECRET, bearer, hs256

ALICE = bearer(hs256("alice"))
BOB = bearer(hs256("bob"))

FORMATS = jsonschema.FormatChecker()
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


@FORMATS.checks("date-time", raises=ValueError)
def _rfc3339(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not RFC3339.fullmatch(value):
        raise ValueError(f"not RFC 3339: {value!r}")
    return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


UUID = {"type": "string", "format": "uuid"}
TIMESTAMP = {"type": "string", "format": "date-time"}

CONVERSATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "user_id", "title", "model_tag", "created_at", "updated_at"],
    "properties": {
        "id": UUID,
        "user_id": UUID,
        "title": {"type": "string"},
        "model_tag": {"type": "string"},
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
    },
}

MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "id",
        "conversation_id",
        "role",
        "content",
        "token_count",
        "model_tag",
        "inference_time_ms",
        "created_at",
    ],
    "properties": {
        "id": UUID,
        "conversation_id": UUID,
        "role": {"enum": ["system", "user", "assistant"]},
        "content": {"type": "string"},
        "token_count": {"type": "integer", "minimum": 0},
        "model_tag": {"type": ["string", "null"]},
        "inference_time_ms": {"type": ["integer", "null"], "minimum": 0},
        "created_at": TIMESTAMP,
    },
}


def conversation(body: Any) -> dict[str, Any]:
    """`body` after checking it against the contract's conversation object."""
    jsonschema.validate(body, CONVERSATION_SCHEMA, format_checker=FORMATS)
    assert isinstance(body, dict)
    return body


def message(body: Any) -> dict[str, Any]:
    """`body` after checking it against the contract's message object."""
    jsonschema.validate(body, MESSAGE_SCHEMA, format_checker=FORMATS)
    assert isinstance(body, dict)
    return body


def events(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of a text/event-stream body; every event must be `data: <json>`."""
    parsed = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        parsed.append(json.loads(block[len("data: ") :]))
    return parsed


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """JWT auth on a fresh SQLite file with the scripted model."""
    return Settings(data_dir=tmp_path / "data", model="scripted", jwt_secret=SECRET)


async def create(
    client: httpx.AsyncClient,
    headers: dict[str, str] = ALICE,
    *,
    title: str = "New conversation",
    model_tag: str = "scripted",
) -> dict[str, Any]:
    """Create a conversation and return it."""
    response = await client.post(
        "/conversations", headers=headers, json={"title": title, "model_tag": model_tag}
    )
    assert response.status_code == 201, response.text
    return conversation(response.json())


async def send(
    client: httpx.AsyncClient, cid: str, content: str, headers: dict[str, str] = ALICE
) -> dict[str, Any]:
    """Post a user message without streaming and return the assistant message."""
    response = await client.post(
        f"/conversations/{cid}/messages",
        headers=headers,
        json={"message": {"role": "user", "content": content}, "stream": False},
    )
    assert response.status_code == 200, response.text
    return message(response.json())


# --- happy paths ----------------------------------------------------------------------


async def test_create_get_list(client: httpx.AsyncClient, app: FastAPI) -> None:
    made = await create(client, title="Plans")
    assert made["title"] == "Plans" and made["model_tag"] == "scripted"
    assert made["user_id"] == str(await app.state.engine.owner_id("alice"))
    assert made["created_at"] == made["updated_at"]
    fetched = await client.get(f"/conversations/{made['id']}", headers=ALICE)
    assert fetched.status_code == 200
    assert conversation(fetched.json()) == made
    listed = await client.get("/conversations", headers=ALICE)
    assert listed.status_code == 200
    assert [conversation(c) for c in listed.json()] == [made]


async def test_list_most_recently_updated_first_with_paging(client: httpx.AsyncClient) -> None:
    first = await create(client, title="first")
    second = await create(client, title="second")
    third = await create(client, title="third")
    listed = (await client.get("/conversations", headers=ALICE)).json()
    assert [c["id"] for c in listed] == [third["id"], second["id"], first["id"]]
    await send(client, first["id"], "bump")
    listed = (await client.get("/conversations", headers=ALICE)).json()
    assert [c["id"] for c in listed] == [first["id"], third["id"], second["id"]]
    page = (await client.get("/conversations?limit=1&offset=1", headers=ALICE)).json()
    assert [c["id"] for c in page] == [third["id"]]
    assert (await client.get("/conversations?offset=5", headers=ALICE)).json() == []


async def test_patch_title_and_model(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        'default = "alpha"\n'
        '[[models]]\nname = "alpha"\nbackend = "scripted"\n'
        '[[models]]\nname = "beta"\nbackend = "scripted"\naliases = ["b"]\n'
    )
    app = create_app(Settings(data_dir=tmp_path / "data", config=config, jwt_secret=SECRET))
    async with app.router.lifespan_context(app):
        await app.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            made = await create(client, title="t", model_tag="alpha")
            beta = app.state.models.get("beta").backend
            alpha = app.state.models.get("alpha").backend
            assert isinstance(beta, ScriptedBackend) and isinstance(alpha, ScriptedBackend)
            reply = await send(client, made["id"], "one")
            assert reply["model_tag"] == "alpha" and len(alpha.calls) == 1 and not beta.calls

            patched = await client.patch(
                f"/conversations/{made['id']}", headers=ALICE, json={"title": "Renamed"}
            )
            assert patched.status_code == 200, patched.text
            assert conversation(patched.json())["title"] == "Renamed"
            assert patched.json()["model_tag"] == "alpha"
            assert patched.json()["updated_at"] > made["updated_at"]

            # The conversation's model_tag (an alias here) selects the model that answers.
            patched = await client.patch(
                f"/conversations/{made['id']}", headers=ALICE, json={"model_tag": "b"}
            )
            assert conversation(patched.json())["model_tag"] == "b"
            assert patched.json()["title"] == "Renamed"
            reply = await send(client, made["id"], "two")
            assert reply["model_tag"] == "beta" and len(beta.calls) == 1
            # The whole history goes to the new model.
            assert [m.content for m in beta.calls[0].messages] == ["one", "Echo 1: one", "two"]

            bad = await client.patch(
                f"/conversations/{made['id']}", headers=ALICE, json={"model_tag": "gpt-17"}
            )
            assert bad.status_code == 422
            assert bad.json()["detail"][0]["loc"] == ["body", "model_tag"]
            assert "alpha" in bad.json()["detail"][0]["msg"]
            before = await client.get(f"/conversations/{made['id']}", headers=ALICE)
            unchanged = await client.patch(f"/conversations/{made['id']}", headers=ALICE, json={})
            assert unchanged.status_code == 200 and unchanged.json() == before.json()


async def test_delete_removes_messages(client: httpx.AsyncClient, app: FastAPI) -> None:
    made = await create(client)
    kept = await create(client)
    await send(client, made["id"], "hello")
    await send(client, kept["id"], "hello")
    response = await client.delete(f"/conversations/{made['id']}", headers=ALICE)
    assert response.status_code == 204 and response.content == b""
    assert (await client.get(f"/conversations/{made['id']}", headers=ALICE)).status_code == 404
    gone = await client.delete(f"/conversations/{made['id']}", headers=ALICE)
    assert gone.status_code == 404
    async with app.state.db.session() as session:
        count = await session.scalar(
            select(func.count()).where(Message.conversation_id == uuid.UUID(made["id"]))
        )
        others = await session.scalar(
            select(func.count()).where(Message.conversation_id == uuid.UUID(kept["id"]))
        )
    assert count == 0 and others == 2
    listed = (await client.get("/conversations", headers=ALICE)).json()
    assert [c["id"] for c in listed] == [kept["id"]]


async def test_stream_reply_and_history(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    made = await create(client)
    scripted.enqueue("Hello there, friend — ünïcode too.")
    response = await client.post(
        f"/conversations/{made['id']}/messages",
        headers=ALICE,
        json={"message": {"role": "user", "content": "Plan a trip to Goa"}},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    parsed = events(response.text)
    tokens, done = parsed[:-1], parsed[-1]
    assert tokens and all(set(e) == {"token"} for e in tokens)
    assert set(done) == {"done", "message"} and done["done"] is True
    reply = message(done["message"])
    assert "".join(e["token"] for e in tokens) == reply["content"]
    assert reply["content"] == "Hello there, friend — ünïcode too."
    assert reply["role"] == "assistant" and reply["model_tag"] == "scripted"
    assert reply["token_count"] == len(tokens) == 6

    history = await client.get(f"/conversations/{made['id']}/messages", headers=ALICE)
    assert history.status_code == 200
    stored = [message(m) for m in history.json()]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "Plan a trip to Goa" and stored[0]["token_count"] == 5
    assert stored[0]["model_tag"] is None and stored[0]["inference_time_ms"] is None
    assert stored[1] == reply
    # The first user message names a conversation titled "New conversation".
    fetched = (await client.get(f"/conversations/{made['id']}", headers=ALICE)).json()
    assert fetched["title"] == "Plan a trip to Goa"


async def test_json_reply_with_sampling(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    made = await create(client, title="Keep me")
    response = await client.post(
        f"/conversations/{made['id']}/messages",
        headers=ALICE,
        json={
            "message": {
                "role": "user",
                "content": "one two three four five six",
                # Generated by the server: ignored when sent.
                "id": str(uuid.uuid4()),
                "token_count": 999,
                "created_at": "2000-01-01T00:00:00Z",
            },
            "stream": False,
            "temperature": 0.5,
            "max_tokens": 3,
        },
    )
    assert response.status_code == 200, response.text
    reply = message(response.json())
    assert reply["content"] == "Echo 1: one" and reply["token_count"] == 3
    assert scripted.calls[-1].params.temperature == 0.5
    assert scripted.calls[-1].params.max_tokens == 3
    history = (await client.get(f"/conversations/{made['id']}/messages", headers=ALICE)).json()
    assert history[0]["token_count"] == 6 and history[0]["id"] != response.json()["id"]
    # A title that is not the default is never replaced.
    fetched = (await client.get(f"/conversations/{made['id']}", headers=ALICE)).json()
    assert fetched["title"] == "Keep me"


async def test_messages_paging(client: httpx.AsyncClient) -> None:
    made = await create(client)
    for text in ("a", "b", "c"):
        await send(client, made["id"], text)
    url = f"/conversations/{made['id']}/messages"
    everything = (await client.get(url, headers=ALICE)).json()
    assert [m["content"] for m in everything] == [
        "a",
        "Echo 1: a",
        "b",
        "Echo 2: b",
        "c",
        "Echo 3: c",
    ]
    page = (await client.get(f"{url}?limit=2&offset=2", headers=ALICE)).json()
    assert [m["content"] for m in page] == ["b", "Echo 2: b"]


# --- one store with the OpenAI dialect ------------------------------------------------


async def test_session_continues_through_rest_and_back(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    headers = {**ALICE, "x-session-key": "wx:dm:alice"}
    first = await client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": "hello from chat"}]},
    )
    assert first.status_code == 200, first.text

    listed = (await client.get("/conversations", headers=ALICE)).json()
    assert len(listed) == 1
    session = conversation(listed[0])
    assert session["title"] == "hello from chat"
    assert (await client.get("/conversations", headers=BOB)).json() == []
    history = (await client.get(f"/conversations/{session['id']}/messages", headers=ALICE)).json()
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "hello from chat"),
        ("assistant", "Echo 1: hello from chat"),
    ]

    rest = await send(client, session["id"], "hello from rest")
    assert rest["content"] == "Echo 2: hello from rest"

    again = await client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": "and chat again"}]},
    )
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == "Echo 3: and chat again"
    assert [m.content for m in scripted.calls[-1].messages] == [
        "hello from chat",
        "Echo 1: hello from chat",
        "hello from rest",
        "Echo 2: hello from rest",
        "and chat again",
    ]
    history = (await client.get(f"/conversations/{session['id']}/messages", headers=ALICE)).json()
    assert len(history) == 6


# --- refusals -------------------------------------------------------------------------


def routes(cid: str) -> list[tuple[str, str, Any]]:
    """(method, url, body) for every route that names a conversation."""
    return [
        ("GET", f"/conversations/{cid}", None),
        ("PATCH", f"/conversations/{cid}", {"title": "stolen"}),
        ("DELETE", f"/conversations/{cid}", None),
        ("GET", f"/conversations/{cid}/messages", None),
        (
            "POST",
            f"/conversations/{cid}/messages",
            {"message": {"role": "user", "content": "hi"}, "stream": False},
        ),
        (
            "POST",
            f"/conversations/{cid}/messages",
            {"message": {"role": "user", "content": "hi"}, "stream": True},
        ),
    ]


async def test_401_without_or_with_bad_token(client: httpx.AsyncClient) -> None:
    made = await create(client)
    body = {"title": "x", "model_tag": "scripted"}
    requests = [
        ("GET", "/conversations", None),
        ("POST", "/conversations", body),
        *routes(made["id"]),
    ]
    bad_tokens: list[dict[str, str]] = [
        {},
        bearer("not-a-token"),
        bearer(hs256("alice", secret="a-different-secret-of-over-32-bytes")),
        bearer(hs256("alice", ttl=-600)),
        {"Authorization": "Token abc"},
    ]
    for method, url, json_body in requests:
        for headers in bad_tokens:
            response = await client.request(method, url, headers=headers, json=json_body)
            assert response.status_code == 401, (method, url, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert set(response.json()) == {"detail"}
    # Nothing changed.
    fetched = await client.get(f"/conversations/{made['id']}", headers=ALICE)
    assert fetched.json() == made


async def test_404_for_other_owners_and_unknown_ids(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    made = await create(client)
    await send(client, made["id"], "secret plans")
    calls = len(scripted.calls)
    for cid, headers in ((made["id"], BOB), (str(uuid.uuid4()), ALICE)):
        for method, url, body in routes(cid):
            response = await client.request(method, url, headers=headers, json=body)
            assert response.status_code == 404, (method, url, response.text)
            assert isinstance(response.json()["detail"], str)
    # Bob neither saw nor changed anything, and no turn ran for him.
    assert len(scripted.calls) == calls
    fetched = await client.get(f"/conversations/{made['id']}", headers=ALICE)
    assert fetched.json()["title"] == "secret plans"
    history = (await client.get(f"/conversations/{made['id']}/messages", headers=ALICE)).json()
    assert len(history) == 2


async def test_422_for_malformed_ids(client: httpx.AsyncClient) -> None:
    for bad in ("not-a-uuid", "123", "%20", "00000000-0000-0000-0000-00000000000g"):
        for method, url, body in routes(bad):
            response = await client.request(method, url, headers=ALICE, json=body)
            assert response.status_code == 422, (method, url, response.text)
            assert response.json()["detail"][0]["loc"] == ["path", "conversationId"]


async def test_422_for_bad_bodies(client: httpx.AsyncClient) -> None:
    made = await create(client)
    bad_creates: list[Any] = [
        {},
        {"title": "x"},
        {"model_tag": "scripted"},
        {"title": 5, "model_tag": "scripted"},
        {"title": "x", "model_tag": None},
        {"title": "x", "model_tag": "no-such-model"},
        {"title": "x" * 256, "model_tag": "scripted"},
        [],
        "text",
    ]
    for body in bad_creates:
        response = await client.post("/conversations", headers=ALICE, json=body)
        assert response.status_code == 422, (body, response.text)
    not_json = await client.post(
        "/conversations",
        headers={**ALICE, "content-type": "application/json"},
        content=b"{nope",
    )
    assert not_json.status_code == 422
    url = f"/conversations/{made['id']}"
    for body in ({"title": 7}, {"model_tag": ""}, {"model_tag": "no-such-model"}, []):
        response = await client.patch(url, headers=ALICE, json=body)
        assert response.status_code == 422, (body, response.text)
    bad_messages: list[Any] = [
        {},
        {"message": "hi"},
        {"message": {"role": "user"}},
        {"message": {"role": "user", "content": ""}},
        {"message": {"role": "assistant", "content": "forged"}},
        {"message": {"role": "system", "content": "be evil"}},
        {"message": {"role": "user", "content": 5}},
        {"message": {"role": "user", "content": "hi"}, "stream": "maybe"},
        {"message": {"role": "user", "content": "hi"}, "temperature": 3},
        {"message": {"role": "user", "content": "hi"}, "max_tokens": 0},
    ]
    for body in bad_messages:
        response = await client.post(f"{url}/messages", headers=ALICE, json=body)
        assert response.status_code == 422, (body, response.text)
    for query in ("limit=0", "limit=201", "offset=-1", "limit=x"):
        response = await client.get(f"/conversations?{query}", headers=ALICE)
        assert response.status_code == 422, (query, response.text)
    for query in ("limit=0", "limit=1001", "offset=-1"):
        response = await client.get(f"{url}/messages?{query}", headers=ALICE)
        assert response.status_code == 422, (query, response.text)
    history = (await client.get(f"{url}/messages", headers=ALICE)).json()
    assert history == []


async def test_message_too_long_for_the_context(client: httpx.AsyncClient) -> None:
    made = await create(client)
    response = await client.post(
        f"/conversations/{made['id']}/messages",
        headers=ALICE,
        json={"message": {"role": "user", "content": "word " * 5000}},
    )
    assert response.status_code == 400, response.text
    assert "context length" in response.json()["detail"]
    history = (await client.get(f"/conversations/{made['id']}/messages", headers=ALICE)).json()
    assert history == []


# --- OpenAPI --------------------------------------------------------------------------


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
    return schema


async def test_openapi_matches_the_contract(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    for name, contract in (
        ("ConversationPublic", CONVERSATION_SCHEMA),
        ("MessagePublic", MESSAGE_SCHEMA),
    ):
        schema = schemas[name]
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == set(contract["properties"]), name
        assert set(schema["required"]) == set(contract["required"]), name

    paths = spec["paths"]
    operation_ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids)), "a generated client needs unique ids"
    assert paths["/conversations"]["get"]["operationId"] == "listConversations"
    expected = {
        "/conversations": {"get": "200", "post": "201"},
        "/conversations/{conversationId}": {"get": "200", "patch": "200", "delete": "204"},
        "/conversations/{conversationId}/messages": {"get": "200", "post": "200"},
    }
    for path, methods in expected.items():
        for method, status in methods.items():
            operation = paths[path][method]
            assert status in operation["responses"], (path, method)
            assert "401" in operation["responses"] and "422" in operation["responses"]
            if "{conversationId}" in path:
                assert "404" in operation["responses"]
                (param,) = [p for p in operation["parameters"] if p["in"] == "path"]
                assert param["name"] == "conversationId"
                assert param["schema"]["format"] == "uuid"
    create_body = _resolve(
        spec,
        paths["/conversations"]["post"]["requestBody"]["content"]["application/json"]["schema"],
    )
    assert set(create_body["required"]) == {"title", "model_tag"}
    post = paths["/conversations/{conversationId}/messages"]["post"]
    assert set(post["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    body = _resolve(spec, post["requestBody"]["content"]["application/json"]["schema"])
    assert body["required"] == ["message"]
    assert body["properties"]["stream"]["default"] is True


async def test_responses_validate_against_openapi_schemas(client: httpx.AsyncClient) -> None:
    """Bodies also match the schemas the server publishes, as a generated client reads them."""
    spec = (await client.get("/openapi.json")).json()

    def check(body: Any, path: str, method: str, status: str) -> None:
        schema = spec["paths"][path][method]["responses"][status]["content"]["application/json"][
            "schema"
        ]
        document = {**schema, "components": spec["components"]}
        # Published refs point at #/components, so the components travel with the schema.
        jsonschema.validate(body, document, format_checker=FORMATS)

    made = await create(client)
    check(made, "/conversations", "post", "201")
    reply = await send(client, made["id"], "hi")
    check(reply, "/conversations/{conversationId}/messages", "post", "200")
    listed = (await client.get("/conversations", headers=ALICE)).json()
    check(listed, "/conversations", "get", "200")
    history = (await client.get(f"/conversations/{made['id']}/messages", headers=ALICE)).json()
    check(history, "/conversations/{conversationId}/messages", "get", "200")
    missing = await client.get(f"/conversations/{uuid.uuid4()}", headers=ALICE)
    check(missing.json(), "/conversations/{conversationId}", "get", "404")
    invalid = await client.get("/conversations/nope", headers=ALICE)
    check(invalid.json(), "/conversations/{conversationId}", "get", "422")
    with pytest.raises(jsonschema.ValidationError):
        check({**made, "session_key": "x"}, "/conversations", "post", "201")


# --- failures during generation -------------------------------------------------------


class FailingBackend(ScriptedBackend):
    """Scripted replies that break after `after` tokens, as an upstream that drops would."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        session: str | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        produced = 0
        async for chunk in super().stream(messages, params, session=session):
            if produced == self.after:
                raise BackendError("the upstream went away; try again")
            produced += 1
            yield chunk


@pytest.fixture
async def failing_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An app whose `early` model fails before any text and whose `late` one after two tokens."""
    models = ModelRegistry(
        [
            LoadedModel(ModelSpec(name="early", backend="scripted"), FailingBackend(0), 0),
            LoadedModel(ModelSpec(name="late", backend="scripted"), FailingBackend(2), 0),
        ],
        default="late",
    )
    settings = Settings(data_dir=tmp_path / "data", jwt_secret=SECRET)
    app = create_app(settings, models=models)
    async with app.router.lifespan_context(app):
        await app.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield client


async def test_error_after_the_stream_started(failing_client: httpx.AsyncClient) -> None:
    made = await create(failing_client, model_tag="late")
    response = await failing_client.post(
        f"/conversations/{made['id']}/messages",
        headers=ALICE,
        json={"message": {"role": "user", "content": "tell me a long story"}},
    )
    assert response.status_code == 200
    parsed = events(response.text)
    assert parsed[:2] == [{"token": "Echo"}, {"token": " 1:"}]
    assert parsed[2] == {"error": {"message": "the upstream went away; try again"}}
    done = parsed[3]
    assert done["done"] is True and len(parsed) == 4
    # The partial reply is kept, and is what the done event carries.
    partial = message(done["message"])
    assert partial["content"] == "Echo 1:"
    history = (
        await failing_client.get(f"/conversations/{made['id']}/messages", headers=ALICE)
    ).json()
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1] == partial


async def test_error_before_any_text_gets_a_status(failing_client: httpx.AsyncClient) -> None:
    made = await create(failing_client, model_tag="early")
    for stream in (True, False):
        response = await failing_client.post(
            f"/conversations/{made['id']}/messages",
            headers=ALICE,
            json={"message": {"role": "user", "content": "hello"}, "stream": stream},
        )
        assert response.status_code == 500, response.text
        assert response.json() == {"detail": "the upstream went away; try again"}
