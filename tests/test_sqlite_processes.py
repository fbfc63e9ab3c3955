"""Two server processes on one SQLite file: turns on one conversation never interleave."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx

from .conftest import start_server


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "scripted.toml"
    path.write_text('[[models]]\nname = "scripted"\nbackend = "scripted"\ntoken_delay = 0.001\n')
    return path


async def test_hundred_turns_on_one_session_across_two_processes(tmp_path: Path) -> None:
    data = tmp_path / "shared"
    args = ("--config", str(_config(tmp_path)), "--model", "scripted")
    # No PARLOUR_DATABASE_URL: both use the SQLite file in the one data directory.
    servers = [start_server(data, *args, env={}) for _ in range(2)]
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            replies = await asyncio.gather(
                *(
                    client.post(
                        f"{servers[i % 2].url}/v1/chat/completions",
                        headers={"x-session-key": "shared"},
                        json={"messages": [{"role": "user", "content": f"message {i}"}]},
                    )
                    for i in range(100)
                )
            )
        assert [r.status_code for r in replies] == [200] * 100, [
            r.text for r in replies if r.status_code != 200
        ]
    finally:
        for server in servers:
            server.stop()
    with sqlite3.connect(data / "parlour.db") as db:
        rows = db.execute(
            "SELECT m.position, m.role, m.content FROM messages m "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE c.session_key = 'shared' ORDER BY m.position"
        ).fetchall()
    assert [position for position, _role, _content in rows] == list(range(200))
    assert [role for _position, role, _content in rows] == ["user", "assistant"] * 100
    for (_p, _r, asked), (position, _role, answer) in zip(rows[::2], rows[1::2], strict=True):
        assert answer == f"Echo {position // 2 + 1}: {asked}"
