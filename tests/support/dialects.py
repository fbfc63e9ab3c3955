"""Helpers for the stateless dialects' tests: event streams, knowledge bases and bots over HTTP."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.support.kb_documents import DOCUMENTS


def events(body: str) -> tuple[list[Any], list[str]]:
    """The JSON `data:` payloads of an event stream (up to and without [DONE]) and its
    comment lines. Raises if the stream does not end with [DONE]."""
    payloads: list[Any] = []
    comments: list[str] = []
    done = False
    for block in body.split("\n\n"):
        for line in block.split("\n"):
            if not line:
                continue
            assert not done, f"event after [DONE]: {line!r}"
            if line.startswith(":"):
                comments.append(line)
            elif line == "data: [DONE]":
                done = True
            else:
                assert line.startswith("data: "), line
                payloads.append(json.loads(line.removeprefix("data: ")))
    assert done, "the stream did not end with [DONE]"
    return payloads, comments


async def make_kb(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """Create a knowledge base holding the test documents through the admin API."""
    created = await client.post("/admin/kbs", json={"name": name, "description": "test"})
    assert created.status_code == 201, created.text
    files = [("file", (n, text.encode(), "text/markdown")) for n, text in DOCUMENTS.items()]
    uploaded = await client.post(f"/admin/kbs/{name}/documents", files=files)
    assert uploaded.status_code == 200, uploaded.text
    assert {r["status"] for r in uploaded.json()["results"]} == {"added"}
    result: dict[str, Any] = created.json()
    return result


async def make_bot(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    """Create a bot through the admin API and return it."""
    body = {"slug": "taxson", "name": "Taxson", "system_prompt": "You explain taxes.", **fields}
    created = await client.post("/admin/bots", json=body)
    assert created.status_code == 201, created.text
    result: dict[str, Any] = created.json()
    return result
