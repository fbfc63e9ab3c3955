"""The upstream `openai` backend against real OpenAI-compatible server processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from parlour.app import create_app
from parlour.models import embedded_gguf
from parlour.settings import Settings

from .conftest import free_port

Upstream = Callable[..., str]


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited early with {process.returncode}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """Start fake upstream processes: upstream(mode=..., words=..., delay=...) -> base URL."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(mode: str = "ok", words: int = 20, delay: float = 0.0) -> str:
        port = free_port()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fake_upstream",
                "--port",
                str(port),
                "--mode",
                mode,
                "--words",
                str(words),
                "--delay",
                str(delay),
            ]
        )
        processes.append(process)
        _wait_http(f"http://127.0.0.1:{port}/stats", process)
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server on the bundled GGUF."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.llama_server",
            "--model",
            str(embedded_gguf()),
            "--model_alias",
            "smol",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=15)


def _config(tmp_path: Path, *urls: str, read_timeout: float = 30.0) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(
        "[[models]]\n"
        'name = "upstream"\n'
        'backend = "openai"\n'
        f"base_urls = {json.dumps(list(urls))}\n"
        'upstream_model = "smol"\n'
        "context_length = 2048\n"
        "max_tokens = 32\n"
        "connect_timeout = 2\n"
        f"read_timeout = {read_timeout}\n"
    )
    return path


async def _client(tmp_path: Path, *urls: str, **kwargs: float) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        data_dir=tmp_path / "data", config=_config(tmp_path, *urls, **kwargs), model="upstream"
    )
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def _ask(text: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 12, **extra}


def _sse(body: str) -> list[dict[str, object]]:
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.model
async def test_real_upstream_streams_and_remembers(tmp_path: Path, llama_server: str) -> None:
    async for client in _client(tmp_path, llama_server):
        headers = {"x-session-key": "up:1"}
        first = await client.post(
            "/v1/chat/completions", headers=headers, json=_ask("Say hello.", temperature=0)
        )
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["model"] == "upstream"
        assert body["choices"][0]["message"]["content"].strip()
        assert 0 < body["usage"]["completion_tokens"] <= 12

        streamed = await client.post(
            "/v1/chat/completions",
            headers=headers,
            json=_ask("And again.", stream=True, stream_options={"include_usage": True}),
        )
        assert streamed.status_code == 200
        events = _sse(streamed.text)
        text = "".join(
            str(c["delta"].get("content") or "")
            for e in events
            for c in e["choices"]  # type: ignore[attr-defined]
        )
        assert text.strip()
        usage = events[-1]["usage"]
        assert usage["completion_tokens"] > 0  # type: ignore[index]
        # The second turn carried the first one's history to the upstream.
        assert usage["prompt_tokens"] > body["usage"]["prompt_tokens"]  # type: ignore[index]


async def test_usage_comes_from_the_upstream(tmp_path: Path, upstream: Upstream) -> None:
    url = upstream(words=7)
    async for client in _client(tmp_path, url):
        reply = await client.post(
            "/v1/chat/completions", headers={"x-session-key": "u"}, json=_ask("one two three")
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4 w5 w6"
        # The fake upstream counts words: its figures, not parlour's estimate, are reported.
        assert body["usage"]["completion_tokens"] == 7
        assert body["usage"]["prompt_tokens"] == 3


async def test_failover_from_dead_endpoints_to_a_live_one(
    tmp_path: Path, upstream: Upstream
) -> None:
    failing = upstream(mode="error")
    live = upstream(words=3)
    async for client in _client(tmp_path, _dead_url(), failing, live):
        reply = await client.post(
            "/v1/chat/completions", headers={"x-session-key": "f"}, json=_ask("hi")
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "w0 w1 w2"
    async with httpx.AsyncClient() as client:
        stats = (await client.get(failing.removesuffix("/v1") + "/stats")).json()
    assert stats["requests"] == 1


async def test_all_endpoints_dead_is_503_in_each_mode(tmp_path: Path, upstream: Upstream) -> None:
    failing = upstream(mode="error")
    async for client in _client(tmp_path, _dead_url(), failing):
        for stream in (False, True):
            reply = await client.post(
                "/v1/chat/completions",
                headers={"x-session-key": f"dead-{stream}"},
                json=_ask("hi", stream=stream),
            )
            assert reply.status_code == 503, reply.text
            error = reply.json()["error"]
            assert error["code"] == "backend_unavailable"
            assert "running" in error["message"]


async def test_slow_upstream_is_504(tmp_path: Path, upstream: Upstream) -> None:
    url = upstream(mode="hang")
    async for client in _client(tmp_path, url, read_timeout=0.5):
        reply = await client.post(
            "/v1/chat/completions", headers={"x-session-key": "slow"}, json=_ask("hi")
        )
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["code"] == "backend_timeout"


async def test_client_disconnect_closes_the_upstream_stream(
    tmp_path: Path, upstream: Upstream, server_factory: Callable[..., object]
) -> None:
    url = upstream(words=400, delay=0.02)
    server = server_factory("--config", str(_config(tmp_path, url)), "--model", "upstream")
    base = server.url  # type: ignore[attr-defined]
    stats_url = url.removesuffix("/v1") + "/stats"
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST",
            f"{base}/v1/chat/completions",
            headers={"x-session-key": "gone"},
            json=_ask("go", stream=True, max_tokens=400),
        ) as response,
    ):
        async for line in response.aiter_lines():
            if '"content":"w' in line:
                break
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            stats = (await client.get(stats_url)).json()
            if stats["abandoned"]:
                break
            await asyncio.sleep(0.1)
    assert stats == {"requests": 1, "completed": 0, "abandoned": 1}
