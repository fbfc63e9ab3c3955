"""A first end-to-end turn through the in-process app with the scripted backend."""

from __future__ import annotations

import httpx

from parlour.backends.scripted import ScriptedBackend


async def test_session_remembers(client: httpx.AsyncClient, scripted: ScriptedBackend) -> None:
    headers = {"x-session-key": "wx:dm:alice"}
    first = await client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": "hello"}]},
    )
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == "Echo 1: hello"
    second = await client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": "again"}]},
    )
    assert second.json()["choices"][0]["message"]["content"] == "Echo 2: again"
    sent = [m.content for m in scripted.calls[-1].messages]
    assert sent == ["hello", "Echo 1: hello", "again"]
