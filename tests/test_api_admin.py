"""The admin API: bots and knowledge bases under /admin, for admin principals only."""

from __future__ import annotations

from itertools import pairwise

import httpx
from fastapi import FastAPI

from parlour.auth import create_key
from tests.support.dialects import make_bot, make_kb
from tests.support.kb_documents import ANSWER, DOCUMENTS, QUESTION
from tests.support.pdf import make_pdf


async def test_bot_lifecycle(client: httpx.AsyncClient) -> None:
    await make_kb(client, "handbook")
    bot = await make_bot(client, kb="handbook", description="Tax help", max_tokens=100)
    assert bot["slug"] == "taxson" and bot["kb"] == "handbook"
    assert bot["enable_l0_retrieval"] is True and bot["max_tokens"] == 100
    assert set(bot) >= {
        "uid", "slug", "name", "description", "system_prompt", "model", "temperature",
        "max_tokens", "enable_l0_retrieval", "kb", "welcome_message",
    }  # fmt: skip

    duplicate = await client.post(
        "/admin/bots", json={"slug": "taxson", "name": "Again", "system_prompt": "x"}
    )
    assert duplicate.status_code == 409 and "taxson" in duplicate.json()["detail"]
    bad_slug = await client.post(
        "/admin/bots", json={"slug": "Tax Son", "name": "x", "system_prompt": "x"}
    )
    assert bad_slug.status_code == 400 and "slug" in bad_slug.json()["detail"]
    no_kb = await client.post(
        "/admin/bots", json={"slug": "other", "name": "x", "system_prompt": "x", "kb": "nope"}
    )
    assert no_kb.status_code == 404 and "parlour kb add nope" in no_kb.json()["detail"]

    assert (await client.get(f"/admin/bots/{bot['uid']}")).json() == bot
    assert (await client.get("/admin/bots/taxson")).json() == bot
    changed = await client.patch(
        "/admin/bots/taxson", json={"name": "Tax Son", "kb": None, "temperature": 0.5}
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["name"], body["kb"], body["temperature"], body["uid"]) == (
        "Tax Son",
        None,
        0.5,
        bot["uid"],
    )
    out_of_range = await client.patch("/admin/bots/taxson", json={"temperature": 3})
    assert out_of_range.status_code == 422
    assert [b["slug"] for b in (await client.get("/admin/bots")).json()] == ["taxson"]

    assert (await client.delete("/admin/bots/taxson")).status_code == 204
    gone = await client.get(f"/admin/bots/{bot['uid']}")
    assert gone.status_code == 404 and gone.json() == {"detail": "Bot not found"}


async def test_knowledge_base_lifecycle(client: httpx.AsyncClient) -> None:
    kb = await make_kb(client, "handbook")
    assert kb["name"] == "handbook" and kb["document_count"] == 0
    again = await client.post("/admin/kbs", json={"name": "handbook"})
    assert again.status_code == 409

    shown = (await client.get("/admin/kbs/handbook")).json()
    assert shown["document_count"] == len(DOCUMENTS)
    assert sorted(d["name"] for d in shown["documents"]) == sorted(DOCUMENTS)

    # The same bytes, a renamed copy, a changed file and a PDF in one upload.
    changed = "Rye crackers need caraway seeds and a very hot oven.\n"
    pdf = make_pdf([["Cover page."], ["Descale the kettle monthly with citric acid."]])
    files = [
        ("file", ("texas-taxes.md", DOCUMENTS["texas-taxes.md"].encode(), "text/markdown")),
        ("file", ("taxes-copy.md", DOCUMENTS["texas-taxes.md"].encode(), "text/markdown")),
        ("file", ("sourdough.txt", changed.encode(), "text/plain")),
        ("other", ("kettle.pdf", pdf, "application/pdf")),
    ]
    uploaded = await client.post("/admin/kbs/handbook/documents", files=files)
    assert uploaded.status_code == 200, uploaded.text
    assert [(r["name"], r["status"], r["same_as"]) for r in uploaded.json()["results"]] == [
        ("texas-taxes.md", "unchanged", None),
        ("taxes-copy.md", "duplicate", "texas-taxes.md"),
        ("sourdough.txt", "replaced", None),
        ("kettle.pdf", "added", None),
    ]

    found = await client.get("/admin/kbs/handbook/search", params={"q": QUESTION})
    hits = found.json()["data"]
    assert hits[0]["document"] == "texas-taxes.md" and ANSWER in hits[0]["content"]
    assert all(a["score"] >= b["score"] for a, b in pairwise(hits))
    kettle = await client.get("/admin/kbs/handbook/search", params={"q": "descale kettle"})
    assert kettle.json()["data"][0]["source"] == "kettle.pdf p. 2"
    stale = await client.get("/admin/kbs/handbook/search", params={"q": "levain boule"})
    assert stale.json()["data"] == []

    deleted = await client.delete("/admin/kbs/handbook/documents/texas-taxes.md")
    assert deleted.status_code == 204
    found = await client.get("/admin/kbs/handbook/search", params={"q": QUESTION})
    assert "texas-taxes.md" not in {h["document"] for h in found.json()["data"]}

    renamed = await client.patch("/admin/kbs/handbook", json={"name": "manuals"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "manuals"
    listed = (await client.get("/admin/kbs")).json()
    assert [(k["name"], k["document_count"]) for k in listed] == [("manuals", 4)]
    assert (await client.delete("/admin/kbs/manuals")).status_code == 204
    assert (await client.get("/admin/kbs/manuals")).status_code == 404


async def test_upload_problems(client: httpx.AsyncClient) -> None:
    missing = await client.post(
        "/admin/kbs/nope/documents", files=[("file", ("a.txt", b"hello", "text/plain"))]
    )
    assert missing.status_code == 404
    await client.post("/admin/kbs", json={"name": "kb"})
    binary = await client.post(
        "/admin/kbs/kb/documents", files=[("file", ("a.bin", b"\x00\x01", "application/x"))]
    )
    assert binary.status_code == 400 and "a.bin" in binary.json()["detail"]
    not_multipart = await client.post("/admin/kbs/kb/documents", json={"text": "hi"})
    assert not_multipart.status_code == 400 and "multipart" in not_multipart.json()["detail"]
    bad_name = await client.post("/admin/kbs", json={"name": "no spaces"})
    assert bad_name.status_code == 400


async def test_admin_routes_need_an_admin_key(app: FastAPI, client: httpx.AsyncClient) -> None:
    user = await create_key(app.state.db, owner="bob")
    admin = await create_key(app.state.db, owner="root", admin=True)
    as_user = {"Authorization": f"Bearer {user.secret}"}
    as_admin = {"Authorization": f"Bearer {admin.secret}"}
    for path in ("/admin/bots", "/admin/kbs", "/v1/usage"):
        anonymous = await client.get(path)
        assert anonymous.status_code == 401 and "detail" in anonymous.json()
        forbidden = await client.get(path, headers=as_user)
        assert forbidden.status_code == 403
        assert "parlour key create" in forbidden.json()["detail"]
        assert (await client.get(path, headers=as_admin)).status_code == 200
    # Users with an ordinary key can still chat with bots and list them.
    assert (await client.get("/v1/bots", headers=as_user)).status_code == 200
    kernel2 = await client.post("/api/kernel2/chat", json={"messages": []})
    assert kernel2.status_code == 401
    assert kernel2.json()["success"] is False and kernel2.json()["code"] == 401


async def test_bot_with_a_chosen_uid(client: httpx.AsyncClient) -> None:
    uid = "edf826b8-1b75-4f57-bd26-641c897f9c1e"
    body = {"uid": uid, "slug": "seed", "name": "Seed", "system_prompt": "x"}
    made = await client.post("/admin/bots", json=body)
    assert made.status_code == 201 and made.json()["uid"] == uid
    again = await client.post("/admin/bots", json={**body, "slug": "seed-two"})
    assert again.status_code == 409 and uid in again.json()["detail"]
    bad = await client.post("/admin/bots", json={**body, "uid": "not-a-uuid", "slug": "x"})
    assert bad.status_code == 422
    assert (await client.get(f"/admin/bots/{uid}")).json()["slug"] == "seed"
