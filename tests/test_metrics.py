"""/metrics: Prometheus text that parses, and counters that move by what happened."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from parlour.app import create_app
from parlour.auth import create_key
from parlour.backends.scripted import ScriptedBackend
from parlour.settings import Settings

from .conftest import POSTGRES_ADMIN_URL, ServerProcess, fresh_database, start_server

URL = "/v1/chat/completions"


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of the samples of this name whose labels include `labels`."""
    return sum(
        s.value
        for s in found
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def scrape(client: httpx.AsyncClient) -> list[Sample]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_turns_move_the_counters_by_what_happened(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    before = await scrape(client)
    assert value(before, "parlour_prompt_tokens_evaluated_total") == 0
    assert value(before, "parlour_model_ready", model="scripted") == 1
    usages, scrapes = [], []
    for text in ("hello there", "and a follow-up question"):
        response = await client.post(URL, json=ask(text), headers={"x-session-key": "m"})
        assert response.status_code == 200, response.text
        usages.append(response.json()["usage"])
        scrapes.append(await scrape(client))
    middle, after = scrapes
    statements = "parlour_db_statement_duration_seconds_count"
    # The follow-up stores two messages and the usage row at least (on SQLite outside
    # SQLAlchemy), and the scrape itself runs none.
    assert value(after, statements) - value(middle, statements) >= 3

    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    evaluated = value(after, "parlour_prompt_tokens_evaluated_total", model="scripted")
    reused = value(after, "parlour_prompt_tokens_reused_total", model="scripted")
    assert evaluated + reused == prompt
    assert reused > 0  # the follow-up began with the first turn's prompt
    assert value(after, "parlour_completion_tokens_total", model="scripted") == completion
    assert value(after, "parlour_generations_total", model="scripted", finish_reason="stop") == 2
    assert value(after, "parlour_time_to_first_token_seconds_count", model="scripted") == 2
    assert value(after, "parlour_turn_duration_seconds_count", model="scripted") == 2
    assert value(after, "parlour_turn_lock_wait_seconds_count") == 2
    assert value(after, "parlour_generations_running") == 0
    assert value(after, "parlour_generations_queued") == 0
    assert value(after, "parlour_db_statement_duration_seconds_count") > 0
    ok = {"route": URL, "method": "POST", "dialect": "openai", "status": "200"}
    assert value(after, "parlour_http_requests_total", **ok) == 2
    assert value(after, "parlour_http_request_duration_seconds_count", route=URL) == 2


async def test_usage_figures_equal_the_token_counters(client: httpx.AsyncClient) -> None:
    for i in range(3):
        await client.post(URL, json=ask(f"turn {i}"), headers={"x-session-key": "u"})
    await client.post(
        "/api/kernel2/chat", json={"messages": [ask("stateless")["messages"][0]], "stream": False}
    )
    found = await scrape(client)
    usage = (await client.get("/v1/usage")).json()
    prompt = sum(row["prompt_tokens"] for row in usage["data"])
    completion = sum(row["completion_tokens"] for row in usage["data"])
    assert (
        value(found, "parlour_prompt_tokens_evaluated_total")
        + value(found, "parlour_prompt_tokens_reused_total")
        == prompt
    )
    assert value(found, "parlour_completion_tokens_total") == completion
    assert value(found, "parlour_generations_total") == 4


async def test_errors_and_unmatched_paths_are_counted_without_their_path(
    client: httpx.AsyncClient,
) -> None:
    await client.post(URL, json=ask("no session"))
    await client.get("/no/such/path/123")
    found = await scrape(client)
    bad = {"route": URL, "dialect": "openai", "status": "400"}
    assert value(found, "parlour_http_requests_total", **bad) == 1
    assert value(found, "parlour_http_requests_total", route="unmatched", status="404") == 1
    assert not [s for s in found if "/no/such" in str(s.labels)]


async def test_metrics_need_an_admin_key_once_auth_is_configured(app: FastAPI) -> None:
    user = await create_key(app.state.db, owner="user")
    admin = await create_key(app.state.db, owner="ops", admin=True)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        anonymous = await client.get("/metrics")
        as_user = await client.get("/metrics", headers={"authorization": f"Bearer {user.secret}"})
        as_admin = await client.get("/metrics", headers={"authorization": f"Bearer {admin.secret}"})
    assert (anonymous.status_code, as_user.status_code, as_admin.status_code) == (401, 403, 200)
    assert value(samples(as_admin.text), "parlour_model_ready") == 1


async def test_each_app_has_its_own_registry(settings: Settings) -> None:
    first, second = create_app(settings), create_app(settings)
    assert first.state.metrics.registry is not second.state.metrics.registry


async def test_metrics_can_be_switched_off(settings: Settings) -> None:
    from dataclasses import replace

    application = create_app(replace(settings, metrics=False))
    async with application.router.lifespan_context(application):
        await application.state.models.wait_loaded()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url="http://localhost"
        ) as client:
            assert (await client.get("/metrics")).status_code == 404
            reply = await client.post(URL, json=ask("hi"), headers={"x-session-key": "k"})
            assert reply.status_code == 200


@pytest.mark.model
def test_the_embedded_model_reports_reused_prompt_tokens(model_server: ServerProcess) -> None:
    def scrape_server() -> list[Sample]:
        return samples(httpx.get(f"{model_server.url}/metrics", timeout=30).text)

    def turn(text: str) -> dict[str, int]:
        response = httpx.post(
            f"{model_server.url}{URL}",
            json={**ask(text), "max_tokens": 8, "temperature": 0},
            headers={"x-session-key": "metrics:reuse"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        usage: dict[str, int] = response.json()["usage"]
        return usage

    start = scrape_server()
    first = turn("Name a colour.")
    middle = scrape_server()
    second = turn("Name another one.")
    end = scrape_server()

    def moved(name: str, a: list[Sample], b: list[Sample]) -> float:
        return value(b, name) - value(a, name)

    reused = "parlour_prompt_tokens_reused_total"
    evaluated = "parlour_prompt_tokens_evaluated_total"
    assert moved(reused, start, middle) + moved(evaluated, start, middle) == first["prompt_tokens"]
    assert moved(reused, middle, end) > first["prompt_tokens"] // 2
    assert moved(reused, middle, end) + moved(evaluated, middle, end) == second["prompt_tokens"]
    assert moved("parlour_completion_tokens_total", middle, end) == second["completion_tokens"]


def test_workers_add_up_in_one_scrape(tmp_path: Path) -> None:
    if not POSTGRES_ADMIN_URL:
        pytest.skip("set PARLOUR_TEST_POSTGRES_URL to run several workers on PostgreSQL")
    with fresh_database() as url:
        assert url is not None
        server = start_server(
            tmp_path / "workers",
            "--model",
            "scripted",
            "--workers",
            "2",
            env={"PARLOUR_DATABASE_URL": url},
        )
        try:
            # No keep-alive: each request is a new connection, for either worker to accept.
            fresh = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(base_url=server.url, timeout=30, limits=fresh) as client:
                for i in range(6):
                    reply = client.post(URL, json=ask(f"hi {i}"), headers={"x-session-key": "w"})
                    assert reply.status_code == 200, reply.text
                scrapes = [samples(client.get("/metrics").text) for _ in range(4)]
        finally:
            server.stop()
    ok = {"route": URL, "status": "200"}
    assert [value(s, "parlour_http_requests_total", **ok) for s in scrapes] == [6] * 4
    assert [value(s, "parlour_generations_total") for s in scrapes] == [6] * 4
    assert [value(s, "parlour_generations_running") for s in scrapes] == [0] * 4
