"""Fixtures: the real app in-process over a temp database, and real server processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from parlour.app import create_app
from parlour.backends.scripted import ScriptedBackend
from parlour.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for an app on a fresh SQLite file with the scripted model."""
    return Settings(data_dir=tmp_path / "data", model="scripted")


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The real app with its lifespan running and its default model loaded."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        await application.state.models.wait_loaded()
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the in-process app."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://parlour.test") as c:
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

    @property
    def database(self) -> Path:
        """The SQLite file the server writes."""
        return self.data_dir / "parlour.db"

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
    server = ServerProcess(f"http://127.0.0.1:{port}", data_dir, process, log)
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
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers that are stopped when the test ends."""
    started: list[ServerProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = start_server(tmp_path / f"server{len(started)}", *args, env=env)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server with the embedded model, shared by a module's tests."""
    server = start_server(tmp_path_factory.mktemp("model-server"))
    yield server
    server.stop()
