"""Several server processes sharing one PostgreSQL: turns stay serialized per conversation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import POSTGRES_ADMIN_URL, ServerProcess, free_port, start_server

DEFAULT_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh PostgreSQL database whichever mode the suite runs in (skipped if none)."""
    import tests.conftest as conftest

    if not POSTGRES_ADMIN_URL:
        monkeypatch.setattr(conftest, "POSTGRES_ADMIN_URL", DEFAULT_ADMIN_URL)
    try:
        conftest._run_async(conftest._admin("SELECT 1"))
    except OSError as exc:  # pragma: no cover - only without a PostgreSQL server
        pytest.skip(f"PostgreSQL is not reachable: {exc}")
    with conftest.fresh_database() as url:
        assert url is not None
        yield url


def _slow_scripted(tmp_path: Path, delay: float) -> Path:
    path = tmp_path / f"scripted-{delay}.toml"
    path.write_text(f'[[models]]\nname = "scripted"\nbackend = "scripted"\ntoken_delay = {delay}\n')
    return path


def _servers(tmp_path: Path, url: str, delay: float, count: int = 2) -> list[ServerProcess]:
    config = str(_slow_scripted(tmp_path, delay))
    return [
        start_server(
            tmp_path / f"server{i}",
            "--config",
            config,
            "--model",
            "scripted",
            env={"PARLOUR_DATABASE_URL": url},
        )
        for i in range(count)
    ]


def _ask(text: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}]}


async def test_fifty_turns_on_one_session_across_two_processes(
    tmp_path: Path, postgres_url: str
) -> None:
    servers = _servers(tmp_path, postgres_url, delay=0.002)
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            replies = await asyncio.gather(
                *(
                    client.post(
                        f"{servers[i % 2].url}/v1/chat/completions",
                        headers={"x-session-key": "shared"},
                        json=_ask(f"message {i}"),
                    )
                    for i in range(50)
                )
            )
        assert [r.status_code for r in replies] == [200] * 50, [r.text for r in replies]
        rows = servers[0].rows(
            "SELECT m.position, m.role, m.content FROM messages m "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE c.session_key = ? ORDER BY m.position",
            "shared",
        )
        assert [r["position"] for r in rows] == list(range(100))
        assert [r["role"] for r in rows] == ["user", "assistant"] * 50
        sent = sorted(r["content"] for r in rows if r["role"] == "user")
        assert sent == sorted(f"message {i}" for i in range(50))
        for user, assistant in zip(rows[::2], rows[1::2], strict=True):
            # Each reply answers the message just before it, after all earlier turns.
            turn = user["position"] // 2 + 1
            assert assistant["content"] == f"Echo {turn}: {user['content']}"
    finally:
        for server in servers:
            server.stop()


async def test_other_sessions_progress_while_one_generates(
    tmp_path: Path, postgres_url: str
) -> None:
    servers = _servers(tmp_path, postgres_url, delay=0.1)
    long_message = " ".join(f"word{i}" for i in range(60))
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            slow = asyncio.create_task(
                client.post(
                    f"{servers[0].url}/v1/chat/completions",
                    headers={"x-session-key": "long"},
                    json=_ask(long_message),
                )
            )
            await asyncio.sleep(0.5)
            quick = await asyncio.gather(
                *(
                    client.post(
                        f"{server.url}/v1/chat/completions",
                        headers={"x-session-key": f"quick-{i}"},
                        json=_ask("hi"),
                    )
                    for i, server in enumerate(servers)
                )
            )
            assert [r.status_code for r in quick] == [200, 200]
            # Both other sessions finished while the long reply was still being generated.
            assert not slow.done()
            assert (await slow).status_code == 200
    finally:
        for server in servers:
            server.stop()


def test_workers_share_one_port_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
    env["PARLOUR_DATABASE_URL"] = postgres_url
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "parlour",
            "serve",
            "--workers",
            "2",
            "--model",
            "scripted",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}")
            subprocess.run(["sleep", "0.1"], check=True)
        for i in range(6):
            reply = httpx.post(
                f"{url}/v1/chat/completions",
                headers={"x-session-key": "workers"},
                json=_ask(f"turn {i}"),
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == f"Echo {i + 1}: turn {i}"
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_workers_refused_on_sqlite(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "parlour",
            "serve",
            "--workers",
            "2",
            "--data-dir",
            str(tmp_path),
            "--model",
            "scripted",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "needs PostgreSQL" in result.stderr
