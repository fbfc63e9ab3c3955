"""`parlour chat`: a terminal conversation through the engine, continued across runs and
visible to every dialect of a server on the same database."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from parlour.app import create_app
from parlour.backends.registry import registry_for
from parlour.backends.scripted import ScriptedBackend
from parlour.cli import chat as terminal
from parlour.cli.main import main
from parlour.models import ModelRegistry
from parlour.settings import Settings
from tests.support.kb_documents import QUESTION, write_documents

SCRIPTED = ("--model", "scripted")


class Chat:
    """Runs parlour commands on one test database; keeps the scripted backends chat used."""

    def __init__(self, tmp_path: Path, database_url: str | None) -> None:
        self.data_dir = tmp_path / "data"
        self.database_url = database_url
        self.backends: list[ScriptedBackend] = []

    @property
    def store(self) -> list[str]:
        """The options that point a command at the test's database."""
        if self.database_url:
            return ["--database-url", self.database_url]
        return ["--data-dir", str(self.data_dir)]

    def _invoke(self, args: list[str], input: str | None) -> Result:
        runner = CliRunner()
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PARLOUR_")}
        result = runner.invoke(main, [*args, *self.store], input=input, env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    async def invoke(self, *args: str, input: str | None = None) -> Result:
        """Run `parlour ARGS…` in-process with no PARLOUR_* variables from outside.

        On a thread: the command runs its own event loop, as it does from a shell.
        """
        return await asyncio.to_thread(self._invoke, list(args), input)

    async def chat(self, *args: str, input: str) -> Result:
        """`parlour chat` with the scripted model, reading `input` as typed lines."""
        return await self.invoke("chat", *SCRIPTED, *args, input=input)

    @property
    def backend(self) -> ScriptedBackend:
        """The scripted backend of the latest chat run."""
        return self.backends[-1]

    @asynccontextmanager
    async def server(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client of the real app on the same database, as `serve` would run it."""
        settings = Settings(
            data_dir=self.data_dir, model="scripted", database_url=self.database_url
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await app.state.models.wait_loaded()
            self.backends.append(app.state.models.default.backend)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                yield client


@pytest.fixture
def cli(tmp_path: Path, database_url: str | None, monkeypatch: pytest.MonkeyPatch) -> Chat:
    chat = Chat(tmp_path, database_url)

    def keep(settings: Settings) -> ModelRegistry:
        registry = registry_for(settings)
        backend = registry.default.backend
        assert isinstance(backend, ScriptedBackend)
        chat.backends.append(backend)
        return registry

    # The real registry, kept so the test can see what the model was sent.
    monkeypatch.setattr("parlour.cli.chat.registry_for", keep)
    return chat


async def test_a_session_continues_across_runs_and_shows_in_the_rest_api(cli: Chat) -> None:
    first = await cli.chat(input="Hello there\nHow are you?\n")
    assert first.exit_code == 0, first.output
    # Streamed replies, one line each; nothing else on stdout when input is not a terminal.
    assert first.stdout == "Echo 1: Hello there\nEcho 2: How are you?\n"

    second = await cli.chat(input="Still there?")  # the last line needs no newline
    assert second.exit_code == 0, second.output
    assert second.stdout == "Echo 3: Still there?\n"
    sent = cli.backend.calls[-1].messages
    assert [m.content for m in sent] == [
        "Hello there",
        "Echo 1: Hello there",
        "How are you?",
        "Echo 2: How are you?",
        "Still there?",
    ]

    async with cli.server() as client:
        conversations = (await client.get("/conversations")).json()
        assert len(conversations) == 1
        assert conversations[0]["title"] == "Hello there"
        assert conversations[0]["model_tag"] == "scripted"
        listing = await client.get(f"/conversations/{conversations[0]['id']}/messages")
        assert [(m["role"], m["content"]) for m in listing.json()] == [
            ("user", "Hello there"),
            ("assistant", "Echo 1: Hello there"),
            ("user", "How are you?"),
            ("assistant", "Echo 2: How are you?"),
            ("user", "Still there?"),
            ("assistant", "Echo 3: Still there?"),
        ]
        assert all(m["token_count"] > 0 for m in listing.json())
        # The same session in the OpenAI dialect: the key is cli:<user name>.
        reply = await client.post(
            "/v1/chat/completions",
            headers={"x-session-key": terminal.default_session_key()},
            json={"messages": [{"role": "user", "content": "From HTTP"}]},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "Echo 4: From HTTP"


async def test_commands_new_help_and_exit(cli: Chat) -> None:
    result = await cli.chat(
        "--session",
        "wx:dm:a",
        input="one\n/help\n/new\n\ntwo\n/exit\nnever answered\n",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Echo 1: one"
    assert "/new - start a fresh conversation" in result.stdout
    assert "/exit - quit" in result.stdout
    assert "Started a new session." in lines
    # After /new the model sees a fresh conversation.
    assert lines[-1] == "Echo 1: two"
    assert "never answered" not in result.stdout

    async with cli.server() as client:
        conversations = (await client.get("/conversations")).json()
        assert sorted(c["title"] for c in conversations) == ["one", "two"]
        # The key is kept exactly: another spelling is another session.
        reply = await client.post(
            "/v1/chat/completions",
            headers={"x-session-key": "wx:dm:a"},
            json={"messages": [{"role": "user", "content": "three"}]},
        )
        assert reply.json()["choices"][0]["message"]["content"] == "Echo 2: three"


async def test_a_rejected_message_is_reported_and_the_chat_goes_on(cli: Chat) -> None:
    too_long = " ".join(["word"] * 5000)  # the scripted model's window is 4096 tokens
    result = await cli.chat(input=f"{too_long}\nshort\n")
    assert result.exit_code == 0, result.output
    assert "maximum context length" in result.stderr
    assert result.stdout == "Echo 1: short\n"
    async with cli.server() as client:
        conversations = (await client.get("/conversations")).json()
        assert [c["title"] for c in conversations] == ["short"]


async def test_a_bot_applies_its_prompt_settings_and_knowledge(cli: Chat, tmp_path: Path) -> None:
    files = write_documents(tmp_path / "docs")
    indexed = await cli.invoke("kb", "add", "taxes", *map(str, files))
    assert indexed.exit_code == 0, indexed.output
    added = await cli.invoke(
        "bot",
        "add",
        "--slug",
        "tax-helper",
        "--name",
        "Tax helper",
        "--system-prompt",
        "You answer tax questions.",
        "--kb",
        "taxes",
        "--temperature",
        "0.3",
        "--max-tokens",
        "64",
        "--welcome-message",
        "Ask me about taxes.",
    )
    assert added.exit_code == 0, added.output

    result = await cli.chat("--bot", "tax-helper", input=f"{QUESTION}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Ask me about taxes.\nEcho 1: {QUESTION}\n"
    call = cli.backend.calls[-1]
    system = call.messages[0]
    assert system.role == "system"
    assert system.content.startswith("You answer tax questions.\n\nReference knowledge:")
    assert "January 31" in system.content and "texas-taxes.md" in system.content
    assert call.params.temperature == 0.3
    assert call.params.max_tokens == 64
    assert [m.content for m in call.messages[1:]] == [QUESTION]

    # The welcome message opens a conversation only once.
    again = await cli.chat("--bot", "tax-helper", input="Thanks\n")
    assert again.stdout == "Echo 2: Thanks\n"
    # The bot stays with the conversation: a run without --bot still uses it.
    later = await cli.chat(input="One more\n")
    assert later.stdout == "Echo 3: One more\n"
    assert cli.backend.calls[-1].messages[0].content.startswith("You answer tax questions.")

    # So does a turn through the REST API on the same conversation.
    async with cli.server() as client:
        (conversation,) = (await client.get("/conversations")).json()
        reply = await client.post(
            f"/conversations/{conversation['id']}/messages",
            json={"message": {"role": "user", "content": "And sales tax?"}, "stream": False},
        )
        assert reply.status_code == 200, reply.text
        sent = cli.backend.calls[-1]
        assert sent.messages[0].content.startswith("You answer tax questions.")
        assert "6.25 percent" in sent.messages[0].content
        assert sent.params.temperature == 0.3
        usage = (await client.get("/v1/usage")).json()
        assert {row["bot_slug"] for row in usage["data"]} == {"tax-helper"}
        assert usage["totals"]["requests"] == 4


async def test_an_unknown_bot_is_refused(cli: Chat) -> None:
    result = await cli.chat("--bot", "nobody", input="hi\n")
    assert result.exit_code == 1
    assert "parlour bot list" in result.stderr


async def test_an_empty_session_key_is_refused(cli: Chat) -> None:
    result = await cli.chat("--session", "", input="hi\n")
    assert result.exit_code == 2
    assert "--session" in result.stderr
