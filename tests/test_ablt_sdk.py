"""The Bot API's own Python SDK (`ablt_python_api`), unmodified, against a real server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from ablt_python_api import ABLTApi, ABLTApi_async, BotSchema, DoneException, StatisticsSchema

from tests.conftest import ServerProcess, server_env
from tests.test_cli_auth import run

#: The uid the source document's first Bot API example names.
SEED_UID = "edf826b8-1b75-4f57-bd26-641c897f9c1e"


@pytest.fixture
def server(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, database_url: str | None
) -> ServerProcess:
    """A server whose database holds the seed's bot, made with `parlour bot add --uid`."""
    data = tmp_path / "ablt"
    code, out, err = run(
        "bot",
        "add",
        "--uid",
        SEED_UID,
        "--slug",
        "helper",
        "--name",
        "Helper",
        "--system-prompt",
        "You help.",
        "--welcome-message",
        "Hi!",
        "--data-dir",
        str(data),
        env=server_env(database_url),
    )
    assert (code, out.strip()) == (0, SEED_UID), err
    return server_factory("--model", "scripted", "--data-dir", str(data))


def sdk_logger() -> logging.Logger:
    """A logger for the SDK, so it writes no api.log of its own."""
    logger = logging.getLogger("tests.ablt")
    logger.addHandler(logging.NullHandler())
    return logger


def test_sync_sdk_lists_finds_and_chats(server: ServerProcess) -> None:
    api = ABLTApi(bearer_token="any", base_api_url=server.url, logger=sdk_logger())
    assert api.health_check()
    listed = api.get_bots()
    assert [BotSchema(**bot).uid for bot in listed] == [SEED_UID]
    found = api.find_bot_by_slug("helper")
    assert found is not None and found["welcome_message"] == "Hi!"
    assert api.find_bot_by_uid(SEED_UID) == found

    reply = list(api.chat(bot_uid=SEED_UID, prompt="Hello", user_id=7))
    assert reply == ["Echo 1: Hello"]
    pieces: list[str] = []
    with pytest.raises(DoneException):  # how the SDK ends a stream
        for piece in api.chat(bot_slug="helper", prompt="Again", stream=True, user_id=7):
            pieces.append(piece)
    assert pieces[0] == "" and "".join(pieces) == "Echo 1: Again"
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert list(api.chat(bot_slug="helper", messages=messages)) == ["Echo 2: Bye"]

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    stats = api.get_usage_statistics(user_id=7, start_date=today, end_date=today)
    assert stats is not None
    checked = StatisticsSchema(**stats)
    assert [item.date.isoformat() for item in checked.items] == [today]
    assert checked.total.original_tokens > 0 and checked.total.response_tokens > 0
    everyone = api.get_statistics_total(start_date=today, end_date=today)
    assert everyone is not None and everyone["total_tokens"] > checked.total.total_tokens


def test_async_sdk_chats(server: ServerProcess) -> None:
    async def talk() -> tuple[list[str], list[str]]:
        api = ABLTApi_async(bearer_token="any", base_api_url=server.url, logger=sdk_logger())
        await api.update_api()
        whole = [p async for p in api.chat(bot_slug="helper", prompt="Hello")]
        pieces: list[str] = []
        with pytest.raises(DoneException):
            async for piece in api.chat(bot_uid=SEED_UID, prompt="Hi", stream=True):
                pieces.append(piece)
        return whole, pieces

    whole, pieces = asyncio.run(talk())
    assert whole == ["Echo 1: Hello"]
    assert "".join(pieces) == "Echo 1: Hi"


def test_health_check_needs_the_token_when_auth_is_on(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory("--model", "scripted", env={"PARLOUR_JWT_SECRET": "s" * 32})
    assert httpx.get(f"{server.url}/health-check", timeout=10).status_code == 401


def test_seed_example_names_a_bot_that_can_exist(server: ServerProcess) -> None:
    # The source document's first Bot API example, verbatim.
    body = {"bot_uid": SEED_UID, "stream": True, "prompt": "Explain how to pay taxes."}
    r = httpx.post(f"{server.url}/chat", json=body, timeout=60)
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0] == 'data: {"content":""}' and events[-1] == "data: [DONE]"
    pieces = [json.loads(e.removeprefix("data: "))["content"] for e in events[:-1]]
    assert "".join(pieces) == "Echo 1: Explain how to pay taxes."


def test_bot_add_checks_the_uid(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    bot = ["bot", "add", "--name", "B", "--system-prompt", "x", "--data-dir", data]
    code, _, err = run(*bot, "--slug", "b1", "--uid", "not-a-uuid")
    assert code == 1 and "Invalid uid" in err
    assert run(*bot, "--slug", "b1", "--uid", SEED_UID)[0] == 0
    code, _, err = run(*bot, "--slug", "b2", "--uid", SEED_UID)
    assert code == 1 and "already exists" in err
