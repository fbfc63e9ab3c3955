"""`parlour bot …` and `parlour kb …`: manage bots and knowledge bases in the server's database."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncSession

from .. import bots
from ..errors import ParlourError
from ..knowledge import index as knowledge
from ..knowledge.documents import SourceDocument, open_document
from ..settings import OPTIONS, Settings, boolean
from ..store.db import Database

T = TypeVar("T")


def setting(name: str, **extra: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A --flag for a setting, with the help text and variable of the settings table."""
    option = OPTIONS[name]
    kwargs: dict[str, Any] = {"default": None, "help": option.describe(name)}
    if option.parse is Path:
        kwargs["type"] = click.Path(
            path_type=Path, dir_okay=name != "config", file_okay=name != "data_dir"
        )
    elif option.parse in (int, float):
        kwargs["type"] = option.parse
    elif option.parse is boolean:
        kwargs["is_flag"] = True
    return click.option("--" + name.replace("_", "-"), **{**kwargs, **extra})


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--data-dir and --database-url, read like `serve` reads them."""
    return setting("data_dir")(setting("database_url")(command))


@contextmanager
def core_errors() -> Iterator[None]:
    """A core error raised inside ends the command with its message (exit status 1)."""
    try:
        yield
    except ParlourError as exc:
        raise click.ClickException(exc.message) from None


def run_on_db(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run `work` on the migrated database that `serve` would use with these settings."""

    async def run() -> T:
        db = Database(settings.resolved_database_url)
        try:
            await db.migrate()
            return await work(db)
        finally:
            await db.close()

    return asyncio.run(run())


def with_db(options: dict[str, Any], work: Callable[[Database], Awaitable[T]]) -> T:
    """Run `work` on the database the --data-dir/--database-url options name; core errors
    become messages."""
    settings = Settings.from_env(
        data_dir=options.get("data_dir"), database_url=options.get("database_url")
    )
    with core_errors():
        return run_on_db(settings, work)


def in_session(options: dict[str, Any], work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one transaction on the migrated database `serve` would use."""

    async def run(db: Database) -> T:
        async with db.session() as session, session.begin():
            return await work(session)

    return with_db(options, run)


def table(rows: Sequence[Sequence[str]]) -> None:
    """Print rows as aligned columns; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# Bots


@click.group()
def bot() -> None:
    """Create, list, show, edit and remove bots (Second Me calls them roles)."""


def bot_options(*, creating: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options that set a bot's fields."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option("--slug", required=creating, help="Unique: a-z, 0-9 and '-'."),
            click.option("--name", required=creating, help="Display name."),
            click.option("--system-prompt", required=creating, help="The bot's instructions."),
            click.option("--description", default=None, help="What the bot is for."),
            click.option("--model", default=None, help="Model name (default: the server's)."),
            click.option("--kb", default=None, help="Knowledge base name to retrieve from."),
            click.option(
                "--l0/--no-l0",
                "enable_l0_retrieval",
                default=None,
                help="Add retrieved knowledge to the prompt [default: on with --kb].",
            ),
            click.option(
                "--temperature", type=click.FloatRange(0, 2), default=None, help="0 to 2."
            ),
            click.option(
                "--max-tokens", type=click.IntRange(min=1), default=None, help="Reply length."
            ),
            click.option("--welcome-message", default=None, help="Shown by clients first."),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def _fields(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k in bots.FIELDS and v is not None}


def _show(view: bots.BotView) -> None:
    for key, value in view.as_dict().items():
        shown = "-" if value is None else value
        if key == "system_prompt" and isinstance(value, str) and "\n" in value:
            shown = "\n" + textwrap.indent(value, "    ")
        click.echo(f"{key}: {shown}")


@bot.command("add")
@bot_options(creating=True)
@click.option("--uid", default=None, help="The bot's uid [default: a new random one].")
@data_options
def bot_add(**options: Any) -> None:
    """Create a bot and print its uid."""

    async def work(session: AsyncSession) -> bots.BotView:
        return await bots.create_bot(session, {**_fields(options), "uid": options["uid"]})

    click.echo(str(in_session(options, work).bot.uid))


@bot.command("list")
@data_options
def bot_list(**options: Any) -> None:
    """List every bot."""
    found = in_session(options, bots.list_bots)
    if not found:
        click.echo("No bots. Create one with `parlour bot add`.", err=True)
        return
    rows = [("UID", "SLUG", "NAME", "MODEL", "KB", "L0")]
    rows += [
        (
            str(v.bot.uid),
            v.bot.slug,
            v.bot.name,
            v.bot.model or "(default)",
            v.kb or "-",
            "on" if v.bot.enable_l0_retrieval else "off",
        )
        for v in found
    ]
    table(rows)


@bot.command("show")
@click.argument("ref", metavar="UID_OR_SLUG")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_options
def bot_show(ref: str, as_json: bool, **options: Any) -> None:
    """Print every field of a bot."""

    async def work(session: AsyncSession) -> bots.BotView:
        return await bots.view(session, await bots.get_bot(session, ref))

    view = in_session(options, work)
    if as_json:
        click.echo(json.dumps(view.as_dict(), indent=2, ensure_ascii=False))
    else:
        _show(view)


@bot.command("edit")
@click.argument("ref", metavar="UID_OR_SLUG")
@bot_options(creating=False)
@click.option(
    "--clear",
    type=click.Choice(["model", "kb", "temperature", "max-tokens"]),
    multiple=True,
    help="Unset a field (back to the server's default). Repeatable.",
)
@data_options
def bot_edit(ref: str, clear: tuple[str, ...], **options: Any) -> None:
    """Change some fields of a bot."""
    changes = _fields(options)
    for field in clear:
        changes[field.replace("-", "_")] = None
    if not changes:
        raise click.UsageError("Nothing to change: give at least one option.")

    async def work(session: AsyncSession) -> bots.BotView:
        return await bots.update_bot(session, await bots.get_bot(session, ref), changes)

    _show(in_session(options, work))


@bot.command("remove")
@click.argument("ref", metavar="UID_OR_SLUG")
@data_options
def bot_remove(ref: str, **options: Any) -> None:
    """Delete a bot (its usage figures stay)."""

    async def work(session: AsyncSession) -> str:
        found = await bots.get_bot(session, ref)
        await bots.remove_bot(session, found)
        return found.slug

    click.echo(f"Removed bot {in_session(options, work)}.")


# Knowledge bases


@click.group()
def kb() -> None:
    """Add documents to knowledge bases, list, search and remove them."""


@kb.command("add")
@click.argument("name")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True)
)
@click.option("--description", default=None, help="Set the knowledge base's description.")
@data_options
def kb_add(name: str, files: tuple[Path, ...], description: str | None, **options: Any) -> None:
    """Index text, Markdown and PDF files into NAME (created if needed). Unchanged files
    are skipped; a changed file replaces its earlier version."""
    _check_name(name)
    sources: list[SourceDocument] = []
    for path in files:
        try:
            sources.append(open_document(path.name, path.read_bytes()))
        except ParlourError as exc:
            raise click.ClickException(f"{path}: {exc.message}") from None
    total = sum(s.page_count for s in sources)
    # Reading (PDF text extraction) is the slow part: do it before touching the database,
    # then index each file in its own short transaction so a running server is not held up.
    with click.progressbar(
        length=total, label=f"Reading {len(sources)} file(s)", file=sys.stderr
    ) as bar:
        for source in sources:
            with core_errors():
                source.load(on_page=lambda: bar.update(1))

    async def work(db: Database) -> list[knowledge.AddResult]:
        async with db.session() as session, session.begin():
            base = await knowledge.ensure_kb(session, name)
            if description is not None:
                await knowledge.update_kb(session, base, description=description)
        results: list[knowledge.AddResult] = []
        for source in sources:
            async with db.session() as session, session.begin():
                base = await knowledge.get_kb(session, name)
                results.append(await knowledge.add_document(session, base, source))
        return results

    for result in with_db(options, work):
        if result.status == "duplicate":
            click.echo(f"{result.name}: skipped, same content as {result.same_as}")
        elif result.status == "unchanged":
            click.echo(f"{result.name}: unchanged ({result.chunks} chunks)")
        else:
            note = "" if result.chunks else " (no text found)"
            click.echo(f"{result.name}: {result.status}, {result.chunks} chunks{note}")


def _check_name(name: str) -> None:
    try:
        knowledge.check_name(name)
    except ParlourError as exc:
        raise click.BadParameter(exc.message, param_hint="NAME") from None


@kb.command("list")
@click.argument("name", required=False)
@data_options
def kb_list(name: str | None, **options: Any) -> None:
    """List knowledge bases, or with NAME the documents in it."""
    if name is not None:

        async def documents(session: AsyncSession) -> list[tuple[str, ...]]:
            base = await knowledge.get_kb(session, name)
            return [
                (d.name, str(d.chunk_count), str(d.size), d.updated_at.strftime("%Y-%m-%d %H:%M"))
                for d in await knowledge.list_documents(session, base)
            ]

        rows = in_session(options, documents)
        if not rows:
            click.echo(f"{name} has no documents. Add some with `parlour kb add {name} FILE…`.")
            return
        table([("DOCUMENT", "CHUNKS", "BYTES", "UPDATED (UTC)"), *rows])
        return
    found = in_session(options, knowledge.list_kbs)
    if not found:
        click.echo("No knowledge bases. Create one with `parlour kb add NAME FILE…`.", err=True)
        return
    table(
        [
            ("NAME", "DOCUMENTS", "CHUNKS", "DESCRIPTION"),
            *((s.kb.name, str(s.documents), str(s.chunks), s.kb.description) for s in found),
        ]
    )


@kb.command("search")
@click.argument("name")
@click.argument("query")
@click.option("--limit", type=click.IntRange(1, 50), default=5, show_default=True)
@data_options
def kb_search(name: str, query: str, limit: int, **options: Any) -> None:
    """Print the chunks of NAME that best match QUERY, best first, with scores and sources."""

    async def work(session: AsyncSession) -> list[knowledge.Hit]:
        base = await knowledge.get_kb(session, name)
        return await knowledge.search(session, base.id, query, limit=limit)

    hits = in_session(options, work)
    if not hits:
        click.echo("No matching chunks.", err=True)
        return
    for rank, hit in enumerate(hits, start=1):
        click.echo(f"{rank}. score {hit.score:.4g}  {hit.source}  (chunk {hit.position})")
        click.echo(textwrap.indent(hit.content, "   "))
        click.echo()


@kb.command("remove")
@click.argument("name")
@click.option(
    "--document",
    "documents",
    multiple=True,
    help="Remove only this document (name or id), not the knowledge base. Repeatable.",
)
@data_options
def kb_remove(name: str, documents: tuple[str, ...], **options: Any) -> None:
    """Delete a knowledge base with its documents, or only some documents."""

    async def work(session: AsyncSession) -> None:
        base = await knowledge.get_kb(session, name)
        if documents:
            for ref in documents:
                await knowledge.remove_document(session, base, ref)
        else:
            await knowledge.remove_kb(session, base)

    in_session(options, work)
    if documents:
        click.echo(f"Removed {len(documents)} document(s) from {name}.")
    else:
        click.echo(f"Removed knowledge base {name}.")
