"""Fixtures: the real app in-process over a temp database, and real server processes."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from parlour.app import create_app
from parlour.backends.scripted import ScriptedBackend
from parlour.settings import Settings

T = TypeVar("T")


#: Run the suite on PostgreSQL: the URL of a server where tests may create databases,
#: e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/postgres. Unset: SQLite files.
POSTGRES_ADMIN_URL = os.environ.get("PARLOUR_TEST_POSTGRES_URL", "")


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, inside or outside a loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(statement: str) -> None:
    import asyncpg

    url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql")
    connection = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _pg_rows(url: str, sql: str, params: tuple[object, ...]) -> list[Any]:
    import asyncpg

    parts = sql.split("?")
    query = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], start=1))
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(plain)
    try:
        return list(await connection.fetch(query, *params))
    finally:
        await connection.close()


@contextmanager
def fresh_database() -> Iterator[str | None]:
    """A new empty PostgreSQL database in PostgreSQL mode (dropped afterwards); else None."""
    if not POSTGRES_ADMIN_URL:
        yield None
        return
    name = f"parlour_test_{uuid.uuid4().hex[:16]}"
    _run_async(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _run_async(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database_url() -> Iterator[str | None]:
    """The test's database URL: a fresh PostgreSQL database, or None for SQLite."""
    with fresh_database() as url:
        yield url


def server_env(database_url: str | None) -> dict[str, str]:
    """Environment for a server process that should use the test's database."""
    return {"PARLOUR_DATABASE_URL": database_url} if database_url else {}


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    """Settings for an app on a fresh database (SQLite or PostgreSQL), scripted model."""
    return Settings(data_dir=tmp_path / "data", model="scripted", database_url=database_url)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The real app for `settings` with its lifespan running and its default model loaded."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        await application.state.models.wait_loaded()
        yield application


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The real app with its lifespan running and its default model loaded."""
    async with running_app(settings) as application:
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the in-process app."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c


@pytest.fixture
def scripted(app: FastAPI) -> ScriptedBackend:
    """The app's scripted backend, to queue replies and inspect what it was sent."""
    backend = app.state.models.default.backend
    assert isinstance(backend, ScriptedBackend)
    return backend


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A `parlour serve` process started by a test."""

    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def database(self) -> Path:
        """The SQLite file the server writes."""
        return self.data_dir / "parlour.db"

    @property
    def database_url(self) -> str | None:
        """The server's PostgreSQL URL in PostgreSQL mode; None when it uses its SQLite file."""
        return self.env.get("PARLOUR_DATABASE_URL")

    def rows(self, sql: str, *params: object) -> list[Any]:
        """Run a query (`?` placeholders) on the server's database; rows index by name."""
        if self.database_url:
            return _run_async(_pg_rows(self.database_url, sql, params))
        connection = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=10)
        connection.row_factory = sqlite3.Row
        try:
            return connection.execute(sql, params).fetchall()
        finally:
            connection.close()

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> ServerProcess:
    """Start `python -m parlour serve` on a free port and wait until /health says ready."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"server-{port}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
    environment.update(env or {})
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "parlour",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--log-level",
                "warning",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", data_dir, process, log, dict(env or {}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()}")


@pytest.fixture
def server_factory(
    tmp_path: Path, database_url: str | None
) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers (sharing the test's database) that are stopped when the test ends."""
    started: list[ServerProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = start_server(
            tmp_path / f"server{len(started)}",
            *args,
            env={**server_env(database_url), **(env or {})},
        )
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server with the embedded model, shared by a module's tests."""
    with fresh_database() as url:
        server = start_server(tmp_path_factory.mktemp("model-server"), env=server_env(url))
        yield server
        server.stop()
