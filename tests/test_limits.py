"""Per-key limits: 429 in each dialect's shape with Retry-After and OpenAI's rate-limit
headers; token quotas that run out and reset; admission bounds that answer at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from sqlalchemy import func, select

from parlour.app import create_app
from parlour.auth import create_key, list_keys, update_key_limits
from parlour.backends.scripted import ScriptedBackend
from parlour.cli.main import main
from parlour.ops.ratelimit import duration
from parlour.settings import Settings
from parlour.store.tables import Usage

from .conftest import POSTGRES_ADMIN_URL, ServerProcess, fresh_database, start_server
from .support.dialects import make_bot

URL = "/v1/chat/completions"
Post = Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]]


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


@asynccontextmanager
async def serving(settings: Settings, **overrides: Any) -> AsyncIterator[FastAPI]:
    """The app with these settings changed, running and loaded."""
    application = create_app(replace(settings, **overrides))
    async with application.router.lifespan_context(application):
        await application.state.models.wait_loaded()
        yield application


@asynccontextmanager
async def http(app: FastAPI, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost", headers=headers
    ) as client:
        yield client


async def conversation_id(client: httpx.AsyncClient) -> str:
    response = await client.post("/conversations", json={"title": "t", "model_tag": "scripted"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def post_openai(client: httpx.AsyncClient, text: str) -> httpx.Response:
    return await client.post(URL, json=ask(text), headers={"x-session-key": "limits"})


async def openai_poster(client: httpx.AsyncClient) -> Post:
    return post_openai


async def kernel2_poster(client: httpx.AsyncClient) -> Post:
    async def post(client: httpx.AsyncClient, text: str) -> httpx.Response:
        return await client.post("/api/kernel2/chat", json={**ask(text), "stream": False})

    return post


async def bot_poster(client: httpx.AsyncClient) -> Post:
    await make_bot(client, slug="helper")

    async def post(client: httpx.AsyncClient, text: str) -> httpx.Response:
        body = {"bot_slug": "helper", "prompt": text, "stream": False}
        return await client.post("/chat", json=body)

    return post


async def conversations_poster(client: httpx.AsyncClient) -> Post:
    cid = await conversation_id(client)

    async def post(client: httpx.AsyncClient, text: str) -> httpx.Response:
        body = {"message": {"role": "user", "content": text}, "stream": False}
        return await client.post(f"/conversations/{cid}/messages", json=body)

    return post


def shape_openai(body: Any) -> None:
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert "3 requests per minute" in body["error"]["message"]


def shape_detail(body: Any) -> None:
    assert set(body) == {"detail"} and "3 requests per minute" in body["detail"]


def shape_kernel2(body: Any) -> None:
    assert body["success"] is False and body["code"] == 429
    assert "3 requests per minute" in body["message"]


@pytest.mark.parametrize(
    ("poster", "shape"),
    [
        (openai_poster, shape_openai),
        (kernel2_poster, shape_kernel2),
        (bot_poster, shape_detail),
        (conversations_poster, shape_detail),
    ],
    ids=["openai", "kernel2", "bot-api", "conversations"],
)
async def test_the_fourth_request_in_a_minute_gets_429(
    settings: Settings,
    poster: Callable[[httpx.AsyncClient], Awaitable[Post]],
    shape: Callable[[Any], None],
) -> None:
    async with serving(settings) as app:
        key = await create_key(app.state.db, owner="alice", admin=True, requests_per_minute=3)
        async with http(app, key.secret) as client:
            post = await poster(client)
            replies = [await post(client, f"message {i}") for i in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429], [r.text for r in replies]
    refused = replies[3]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    shape(refused.json())


async def test_openai_headers_count_down_through_the_sdk(settings: Settings) -> None:
    async with serving(settings) as app:
        key = await create_key(app.state.db, owner="bob", requests_per_minute=3)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as transport:
            sdk = openai.AsyncOpenAI(
                base_url="http://localhost/v1",
                api_key=key.secret,
                http_client=transport,  # type: ignore[arg-type]
                default_headers={"x-session-key": "sdk"},
                max_retries=0,
            )
            remaining = []
            for i in range(3):
                raw = await sdk.chat.completions.with_raw_response.create(
                    model="scripted", messages=[{"role": "user", "content": f"hi {i}"}]
                )
                assert raw.headers["x-ratelimit-limit-requests"] == "3"
                assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
                remaining.append(raw.headers["x-ratelimit-remaining-requests"])
            models = await sdk.models.with_raw_response.list()
            with pytest.raises(openai.RateLimitError) as refused:
                await sdk.chat.completions.create(
                    model="scripted", messages=[{"role": "user", "content": "one more"}]
                )
            # Over the limit, what does not generate is still answered.
            still = await sdk.models.with_raw_response.list()
    assert remaining == ["2", "1", "0"]
    # Listing models is not a generation: it shows the standing without using it up.
    assert models.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.status_code == 429
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.code == "rate_limit_exceeded"
    assert still.http_response.status_code == 200
    assert still.headers["x-ratelimit-remaining-requests"] == "0"


async def test_unlimited_keys_get_no_rate_limit_headers(client: httpx.AsyncClient) -> None:
    response = await post_openai(client, "hi")
    assert response.status_code == 200
    assert not [h for h in response.headers if h.startswith("x-ratelimit")]


async def test_a_token_quota_runs_out_and_resets_the_next_day(settings: Settings) -> None:
    async with serving(settings, tokens_per_day=40) as app, http(app) as client:
        statuses, remaining = [], []
        for i in range(10):
            response = await post_openai(client, f"tell me about token {i}")
            statuses.append(response.status_code)
            remaining.append(int(response.headers["x-ratelimit-remaining-tokens"]))
            if response.status_code == 429:
                break
        refused = response
        assert statuses[-1] == 429 and set(statuses[:-1]) == {200}, statuses
        assert len(statuses) >= 2
        assert remaining[0] == 40 and remaining[-1] == 0
        assert remaining == sorted(remaining, reverse=True)
        body = refused.json()["error"]
        assert (body["type"], body["code"]) == ("tokens", "rate_limit_exceeded")
        assert refused.headers["x-ratelimit-limit-tokens"] == "40"
        assert int(refused.headers["retry-after"]) <= 86_400

        limiter = app.state.limiter
        limiter.clock = lambda: time.time() + 86_400
        again = await post_openai(client, "a new day")
    assert again.status_code == 200, again.text
    assert again.headers["x-ratelimit-remaining-tokens"] == "40"


async def test_a_keys_own_limit_wins_and_zero_means_unlimited(settings: Settings) -> None:
    async with serving(settings, requests_per_minute=1) as app:
        free = await create_key(app.state.db, owner="free", requests_per_minute=0)
        capped = await create_key(app.state.db, owner="capped")
        async with http(app, free.secret) as client:
            free_replies = [(await post_openai(client, "x")).status_code for _ in range(3)]
        async with http(app, capped.secret) as client:
            capped_replies = [(await post_openai(client, "x")).status_code for _ in range(2)]
        await update_key_limits(app.state.db, capped.info.prefix, requests_per_minute=5)
        # A new limit starts a new count, read when the key is next verified.
        async with http(app, capped.secret) as client:
            raised = (await post_openai(client, "x")).status_code
    assert free_replies == [200, 200, 200]
    assert capped_replies == [200, 429]
    assert raised == 200


async def slow_turn(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(URL, json=ask("take your time"), headers={"x-session-key": key})


async def until(condition: Callable[[], bool]) -> None:
    """Wait until `condition` holds (polled; the test's own timeout bounds it)."""
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def test_a_full_queue_refuses_the_third_generation_at_once(settings: Settings) -> None:
    async with serving(settings, max_queue=2) as app, http(app) as client:
        backend = app.state.models.default.backend
        assert isinstance(backend, ScriptedBackend)
        backend.token_delay = 0.05
        admission = app.state.admission
        running = [asyncio.create_task(slow_turn(client, f"s{i}")) for i in range(2)]
        await until(lambda: admission.in_flight == 2 and app.state.metrics.now_running == 2)
        third = await slow_turn(client, "s3")
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        health = await client.get("/health")
        first_two = await asyncio.gather(*running)
        after = await slow_turn(client, "s4")
    assert third.status_code == 503
    assert third.json()["error"]["code"] == "server_overloaded"
    assert int(third.headers["retry-after"]) >= 1
    assert [r.status_code for r in first_two] == [200, 200]
    assert backend.calls and len(backend.calls) == 3  # the third never reached the model
    assert ready.status_code == 503 and ready.json()["status"] == "busy"
    assert ready.json()["queue"]["in_flight"] == 2 and ready.json()["queue"]["limit"] == 2
    assert live.status_code == 200
    assert health.status_code == 200 and health.json()["queue"]["running"] == 2
    assert after.status_code == 200


async def test_one_owner_cannot_take_every_slot(settings: Settings) -> None:
    async with serving(settings, max_concurrent_per_owner=1) as app:
        hog = await create_key(app.state.db, owner="hog")
        other = await create_key(app.state.db, owner="other")
        backend = app.state.models.default.backend
        assert isinstance(backend, ScriptedBackend)
        backend.token_delay = 0.05
        async with http(app, hog.secret) as hogging, http(app, other.secret) as polite:
            first = asyncio.create_task(slow_turn(hogging, "a"))
            await until(lambda: app.state.admission.in_flight == 1)
            second = await slow_turn(hogging, "b")
            others = await slow_turn(polite, "c")
            assert (await first).status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "concurrency"
    assert others.status_code == 200


def test_key_commands_set_and_change_limits(settings: Settings) -> None:
    env = {"PARLOUR_DATA_DIR": str(settings.data_dir)}
    if settings.database_url:
        env["PARLOUR_DATABASE_URL"] = settings.database_url
    runner = CliRunner()
    created = runner.invoke(
        main, ["key", "create", "--owner", "carol", "--rpm", "60", "--tpd", "200000"], env=env
    )
    assert created.exit_code == 0, created.output
    from parlour.cli.admin import run_on_db

    keys = run_on_db(settings, list_keys)
    assert [(k.requests_per_minute, k.tokens_per_day) for k in keys] == [(60, 200000)]
    updated = runner.invoke(main, ["key", "update", str(keys[0].id), "--rpm", "0"], env=env)
    assert updated.exit_code == 0, updated.output
    assert "unlimited requests per minute, 200000 tokens per day" in updated.output
    keys = run_on_db(settings, list_keys)
    assert (keys[0].requests_per_minute, keys[0].tokens_per_day) == (0, 200000)
    missing = runner.invoke(main, ["key", "update", str(uuid.uuid4()), "--tpd", "5"], env=env)
    assert missing.exit_code != 0 and "No API key" in missing.output


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (1, "1s"), (12.2, "13s"), (60, "1m0s"), (3725, "1h2m5s")],
)
def test_durations_are_written_like_openai(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.fixture
def shared_postgres() -> Iterator[str]:
    """A fresh PostgreSQL database for server processes; skipped without one configured."""
    if not POSTGRES_ADMIN_URL:
        pytest.skip("set PARLOUR_TEST_POSTGRES_URL to run server processes on PostgreSQL")
    with fresh_database() as url:
        assert url is not None
        yield url


def test_limits_hold_across_two_processes(tmp_path: Path, shared_postgres: str) -> None:
    env = {
        "PARLOUR_DATABASE_URL": shared_postgres,
        "PARLOUR_REQUESTS_PER_MINUTE": "3",
        "PARLOUR_TOKENS_PER_DAY": "100000",
    }
    servers = [
        start_server(tmp_path / f"server{i}", "--model", "scripted", env=env) for i in range(2)
    ]
    try:
        replies = [
            httpx.post(
                f"{servers[i % 2].url}{URL}",
                json=ask(f"message {i}"),
                headers={"x-session-key": f"p{i}"},
                timeout=30,
            )
            for i in range(5)
        ]
        used = sum(r.json()["usage"]["total_tokens"] for r in replies[:3])
        # Each process writes the tokens it counted within a quarter of a second; both
        # then report what the three replies used in all.
        seen = [until_tokens(server, 100000 - used) for server in servers]
    finally:
        for server in servers:
            server.stop()
    assert [r.status_code for r in replies] == [200, 200, 200, 429, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == [
        "2",
        "1",
        "0",
        "0",
        "0",
    ]
    assert seen == [100000 - used] * 2


def until_tokens(server: ServerProcess, expected: int) -> int:
    """The server's remaining tokens once they equal `expected` (polled, bounded)."""
    remaining = -1
    for _ in range(400):
        models = httpx.get(f"{server.url}/v1/models", timeout=30)
        remaining = int(models.headers["x-ratelimit-remaining-tokens"])
        if remaining == expected:
            break
        time.sleep(0.05)
    return remaining


async def test_streamed_replies_count_against_the_token_quota(settings: Settings) -> None:
    async with serving(settings, tokens_per_day=1000) as app:
        key = await create_key(app.state.db, owner="streamer")
        async with http(app, key.secret) as client:
            streamed = await client.post(
                URL,
                json={**ask("stream this please"), "stream": True},
                headers={"x-session-key": "st"},
            )
            assert streamed.status_code == 200 and "[DONE]" in streamed.text
            after = await post_openai(client, "and now")
        async with app.state.db.read() as session, session.begin():
            recorded = await session.scalar(
                select(func.sum(Usage.prompt_tokens + Usage.completion_tokens))
            )
    assert streamed.headers["x-ratelimit-remaining-tokens"] == "1000"
    # Only the streamed turn had ended when `after` was checked; it counted what usage holds
    # for it (the usage table also holds `after` by now).
    used = 1000 - int(after.headers["x-ratelimit-remaining-tokens"])
    assert 0 < used < recorded
    assert recorded - used == after.json()["usage"]["total_tokens"]


async def test_counters_can_live_in_redis(settings: Settings) -> None:
    pytest.importorskip("coredis", reason="limits[async-redis] is not installed")
    storage = f"redis://127.0.0.1:6379/{uuid.uuid4().int % 16}"
    async with serving(settings, rate_limit_storage=storage, tokens_per_day=10**6) as app:
        if not await app.state.limiter.storage.check():
            pytest.skip("Redis is not reachable at 127.0.0.1:6379")
        key = await create_key(app.state.db, owner=f"redis-{uuid.uuid4()}", requests_per_minute=2)
        async with http(app, key.secret) as client:
            replies = [await post_openai(client, f"r{i}") for i in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["1", "0", "0"]
    tokens = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in replies[:2]]
    assert tokens[0] == 10**6 and tokens[1] < tokens[0]


async def test_a_background_response_holds_its_slot_and_counts_its_tokens(
    settings: Settings,
) -> None:
    async with serving(settings, max_queue=1, tokens_per_day=10_000) as app, http(app) as client:
        backend = app.state.models.default.backend
        assert isinstance(backend, ScriptedBackend)
        backend.token_delay = 0.05
        admission = app.state.admission
        started = await client.post(
            "/v1/responses", json={"input": "write in the background", "background": True}
        )
        assert started.status_code == 200, started.text
        response_id = started.json()["id"]
        # The response is sent; its generation goes on and keeps the one slot.
        assert admission.in_flight == 1
        refused = await slow_turn(client, "meanwhile")
        status = "queued"
        for _ in range(400):
            polled = await client.get(f"/v1/responses/{response_id}")
            status = polled.json()["status"]
            if status not in ("queued", "in_progress"):
                break
            await asyncio.sleep(0.05)
        await until(lambda: admission.in_flight == 0)
        models = await client.get("/v1/models")
    assert refused.status_code == 503
    assert status == "completed"
    usage = polled.json()["usage"]["total_tokens"]
    assert int(models.headers["x-ratelimit-remaining-tokens"]) == 10_000 - usage
