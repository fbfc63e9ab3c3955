"""`parlour chat`: a conversation in the terminal through the engine, no server needed.

The conversation is an OpenAI-dialect session of the local owner, so it continues across
runs and shows up in the REST API like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import click

from .api.openai import HELP_TEXT
from .engine import Engine, TurnRequest, TurnStream
from .errors import ParlourError
from .models import ModelRegistry, build_registry
from .settings import Settings
from .store import queries
from .store.db import Database
from .store.tables import Bot

HELP = HELP_TEXT + "\n/exit - quit (Ctrl-D does too)"
SESSION_KEY_LENGTH = 256


def default_session_key() -> str:
    """`cli:<user name>`: one terminal session per user unless --session says otherwise."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid, e.g. in a bare container
        user = "local"
    return f"cli:{user}"


def check_session_key(key: str) -> str:
    """The key as the OpenAI dialect accepts it: 1 to 256 printable characters."""
    if not key or len(key) > SESSION_KEY_LENGTH or not key.isprintable():
        raise click.BadParameter("use 1 to 256 printable characters", param_hint="--session")
    return key


def _deliver(future: asyncio.Future[str | None], line: str | None) -> None:
    if not future.done():
        future.set_result(line)


def _deliver_error(future: asyncio.Future[str | None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def read_line(prompt: str) -> str | None:
    """One line from standard input without its newline; None at end of input.

    Read on a daemon thread so the event loop keeps running (and Ctrl-C can end the wait)
    while the user types.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str | None] = loop.create_future()

    def work() -> None:
        try:
            line: str | None = input(prompt)
        except EOFError:
            line = None
        except BaseException as exc:
            loop.call_soon_threadsafe(_deliver_error, future, exc)
            return
        loop.call_soon_threadsafe(_deliver, future, line)

    threading.Thread(target=work, name="parlour-chat-input", daemon=True).start()
    return await future


@dataclass
class TerminalChat:
    """The read-answer loop of one `parlour chat` run."""

    engine: Engine
    owner_id: uuid.UUID
    session_key: str
    bot: Bot | None
    #: The model named with --model/PARLOUR_MODEL; None lets the conversation keep its own.
    model: str | None
    interactive: bool
    _turn: TurnStream | None = None

    async def run(self) -> None:
        """Answer lines until /exit or the end of input."""
        await self._welcome()
        with self._interrupts():
            while True:
                line = await read_line("> " if self.interactive else "")
                if line is None:
                    if self.interactive:
                        self._say("")
                    return
                command = line.strip()
                if not command:
                    continue
                if command == "/exit":
                    return
                if command == "/help":
                    self._say(HELP)
                elif command == "/new":
                    await self.engine.reset_session(
                        owner_id=self.owner_id, session_key=self.session_key
                    )
                    self._say("Started a new session.")
                else:
                    await self.answer(line)

    async def answer(self, content: str) -> None:
        """Run one turn, printing the reply as it is generated; errors are reported and
        the loop goes on."""
        printed = False
        try:
            conversation = await self.engine.session_conversation(
                owner_id=self.owner_id,
                session_key=self.session_key,
                model=self.model,
                bot_id=self.bot.uid if self.bot is not None else None,
                content=content,
            )
            self._turn = turn = self.engine.turn(
                TurnRequest(
                    owner_id=self.owner_id,
                    conversation_id=conversation.id,
                    content=content,
                    model=self.model,
                    dialect="cli",
                )
            )
            try:
                async for delta in turn:
                    click.echo(delta, nl=False)
                    printed = True
                result = await turn.result()
            finally:
                self._turn = None
                turn.cancel()
        except ParlourError as exc:
            if printed:
                self._say("")
            click.echo(f"Error: {exc.message}", err=True)
            return
        self._say("")
        if result.finish_reason == "length":
            click.echo("[The reply reached its length limit.]", err=True)
        elif result.finish_reason == "cancelled":
            click.echo("[Stopped.]", err=True)

    async def _welcome(self) -> None:
        if self.bot is None or not self.bot.welcome_message.strip():
            return
        async with self.engine.db.read() as session, session.begin():
            found = await queries.conversation_for_session(session, self.owner_id, self.session_key)
            started = found is not None and bool(await queries.list_messages(session, found.id))
        if not started:
            self._say(self.bot.welcome_message)

    @contextlib.contextmanager
    def _interrupts(self) -> Iterator[None]:
        # Ctrl-C stops a reply that is being written (the part written is kept, as when a
        # client disconnects); at the prompt it ends the chat.
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()

        def interrupt() -> None:
            if self._turn is not None:
                self._turn.cancel()
            elif main is not None:
                main.cancel()

        previous = signal.getsignal(signal.SIGINT)
        try:
            loop.add_signal_handler(signal.SIGINT, interrupt)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)

    def _say(self, text: str) -> None:
        click.echo(text)


async def _find_bot(db: Database, ref: str) -> Bot:
    from . import bots

    async with db.read() as session, session.begin():
        found = await bots.find_bot(session, ref)
    if found is None:
        raise click.ClickException(
            f"No bot {ref!r}. `parlour bot list` shows the bots; `parlour bot add` creates one."
        )
    return found


async def chat(settings: Settings, *, session_key: str, bot_ref: str | None) -> None:
    """Open the store and models like `serve` would, then chat until the user quits."""
    db = Database(settings.resolved_database_url)
    registry: ModelRegistry | None = None
    engine: Engine | None = None
    try:
        await db.migrate()
        bot = await _find_bot(db, bot_ref) if bot_ref is not None else None
        try:
            registry = build_registry(
                model=settings.model,
                config=settings.config,
                strict=settings.strict_models,
                threads=settings.llama_threads,
                state_dir=settings.data_dir / "state",
                cache_dir=settings.cache_dir,
                models_dir=settings.models_dir,
            )
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        engine = Engine(db=db, models=registry)
        owner_id = await engine.owner_id(queries.LOCAL_OWNER)
        interactive = sys.stdin.isatty()
        if interactive:
            click.echo(f"Loading {registry.default.spec.name}…", err=True)
        registry.start_loading()
        await registry.wait_loaded()
        default = registry.ready_model(None)
        if interactive:
            with_bot = f", bot {bot.slug}" if bot is not None else ""
            click.echo(
                f"Session {session_key!r} on {default.spec.name}{with_bot}. "
                "/help lists the commands; /exit or Ctrl-D quits.",
                err=True,
            )
        terminal = TerminalChat(
            engine=engine,
            owner_id=owner_id,
            session_key=session_key,
            bot=bot,
            model=default.spec.name if settings.model is not None else None,
            interactive=interactive,
        )
        try:
            await terminal.run()
        except asyncio.CancelledError:
            # Ctrl-C at the prompt.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            if interactive:
                click.echo("", err=True)
    except ParlourError as exc:
        raise click.ClickException(exc.message) from None
    finally:
        if engine is not None:
            await engine.close()
        if registry is not None:
            await registry.close()
        await db.close()
