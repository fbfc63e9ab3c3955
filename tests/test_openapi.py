"""/openapi.json is one self-contained, valid OpenAPI document covering every dialect."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi import FastAPI
from openapi_spec_validator import validate

from parlour.api.openai_protocol import ChatCompletionRequest
from parlour.api.schema import inline_schema
from parlour.app import create_app
from parlour.settings import Settings

#: One chat route per dialect, each documenting a JSON request body.
CHAT_ROUTES = ("/v1/chat/completions", "/conversations/{conversationId}/messages")
STATELESS_ROUTES = ("/api/kernel2/chat", "/chat", "/v1/chat")


def refs(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    """Every `$ref` in a JSON document, with the pointer of the object holding it."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                yield from refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from refs(value, f"{where}/{index}")


def resolve(document: dict[str, Any], ref: str) -> Any:
    """The target of a local JSON pointer reference; KeyError/IndexError if there is none."""
    assert ref.startswith("#/"), f"{ref} is not a reference inside the document"
    node: Any = document
    for raw in ref.removeprefix("#/").split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def request_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The JSON request body schema of `POST path`, with a top-level reference followed."""
    schema: dict[str, Any] = spec["paths"][path]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    if "$ref" in schema:
        target: dict[str, Any] = resolve(spec, schema["$ref"])
        return target
    return schema


async def openapi(app: FastAPI) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


@pytest.fixture(params=["open", "jwt"])
async def spec(request: pytest.FixtureRequest, settings: Settings) -> dict[str, Any]:
    """The served document, without auth and with auth configured (it adds security schemes)."""
    if request.param == "jwt":
        settings = dataclasses.replace(settings, jwt_secret="s" * 32)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        return await openapi(application)


async def test_every_ref_resolves_inside_the_document(spec: dict[str, Any]) -> None:
    found = list(refs(spec))
    assert found, "the document has no references at all: the walk is broken"
    dangling = []
    for where, ref in found:
        try:
            resolve(spec, ref)
        except (KeyError, IndexError, ValueError):
            dangling.append(f"{where}: {ref}")
    assert not dangling, "references that point nowhere:\n" + "\n".join(dangling)


async def test_every_dialect_documents_its_request_body(spec: dict[str, Any]) -> None:
    for path in (*CHAT_ROUTES, *STATELESS_ROUTES):
        schema = request_schema(spec, path)
        assert schema.get("properties"), path
        # An inlined body schema carries nothing that refers back to its own root.
        assert "$defs" not in schema, path
        assert not [r for _, r in refs(schema) if r.startswith("#/$defs/")], path


async def test_the_document_is_valid_openapi(spec: dict[str, Any]) -> None:
    validate(spec)


async def test_request_schemas_accept_and_reject_like_the_server(spec: dict[str, Any]) -> None:
    # The documented schemas are usable as they stand: a client validating with them
    # agrees with the server about nested parts.
    openai = request_schema(spec, "/v1/chat/completions")
    good = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "stream_options": {"include_usage": True},
    }
    jsonschema.validate(good, openai)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"messages": [{"role": "user", "content": [{"text": 1}]}]}, openai)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "stream_options": {"include_usage": "yes"}}, openai)
    kernel2 = request_schema(spec, "/api/kernel2/chat")
    jsonschema.validate({"messages": [{"role": "user", "content": "hi"}]}, kernel2)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"messages": [{"role": "robot", "content": "hi"}]}, kernel2)


def test_inline_schema_writes_definitions_in_place() -> None:
    schema = inline_schema(ChatCompletionRequest)
    assert "$defs" not in schema
    assert not list(refs(schema))
    items = schema["properties"]["messages"]["items"]
    assert items["properties"]["role"]["enum"][:2] == ["system", "developer"]


def test_inline_schema_refuses_a_recursive_model() -> None:
    from pydantic import BaseModel

    class Node(BaseModel):
        children: list[Node] = []

    Node.model_rebuild()
    with pytest.raises(ValueError, match="recursive"):
        inline_schema(Node)
