"""The `parlour` command line: serve, and the commands that work on the same data."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..settings import Settings
from .admin import bot, data_options, kb, run_on_db, setting
from .limits import key_limit_options, key_update, metrics_multiprocess_env
from .models import model

T = TypeVar("T")


def _settings(**options: Any) -> Settings:
    try:
        return Settings.from_env(**options)
    except ValueError as exc:  # a PARLOUR_* variable that does not parse
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="parlour")
def main() -> None:
    """parlour: a self-hosted chat server for language models with server-side memory."""


def _model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The --model and --config options, shared by `serve` and `chat`."""
    return setting("model")(
        setting("config", type=click.Path(path_type=Path, dir_okay=False, exists=True))(command)
    )


@main.command()
@setting("host")
@setting("port")
@data_options
@_model_options
@setting("insecure")
@setting("workers", type=click.IntRange(min=1))
@setting("log_level")
@setting("log_format", type=click.Choice(["text", "json"]))
def serve(**options: Any) -> None:
    """Start the HTTP server."""
    import uvicorn

    from ..app import create_app, freeze_startup_objects
    from ..ops.logs import configure

    settings = _settings(**options)
    _check_auth(settings)
    configure(level=settings.log_level, log_format=settings.log_format)
    log_level = settings.log_level.lower()
    if settings.workers > 1:
        if settings.resolved_database_url.startswith("sqlite"):
            raise click.ClickException(
                "--workers above 1 needs PostgreSQL: SQLite cannot serialize turns across "
                "processes. Set --database-url postgresql+asyncpg://… or use one worker."
            )
        # Each worker process rebuilds the same settings from the environment.
        os.environ.update(settings.to_env())
        if settings.metrics:
            os.environ.update(metrics_multiprocess_env(settings.data_dir))
        uvicorn.run(
            "parlour.app:app_from_env",
            factory=True,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        return
    from ..api.shutdown import serve as serve_app

    app = create_app(settings)
    freeze_startup_objects()
    serve_app(app, host=settings.host, port=settings.port, log_level=log_level)


def _check_auth(settings: Settings) -> None:
    """Refuse an unusable JWT key, and a non-loopback address with no auth at all."""
    from ..auth import active_keys_exist
    from ..tokens import JwtVerifier

    try:
        verifier = JwtVerifier.from_settings(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if settings.is_loopback or settings.insecure or verifier is not None:
        return
    if not run_on_db(settings, active_keys_exist):
        raise click.ClickException(
            f"Refusing to listen on {settings.host} without authentication: set "
            "PARLOUR_JWT_SECRET (or PARLOUR_JWT_PUBLIC_KEY), create an API key with "
            "`parlour key create --owner NAME`, or pass --insecure if this network is trusted."
        )


@main.group()
def key() -> None:
    """Create, list and revoke API keys (bearer tokens stored hashed)."""


@key.command("create")
@click.option("--owner", required=True, help="The owner whose conversations the key reaches.")
@click.option("--admin", is_flag=True, help="Also allow the admin API under /admin/.")
@key_limit_options
@data_options
def key_create(owner: str, admin: bool, rpm: int | None, tpd: int | None, **options: Any) -> None:
    """Create a key and print it; it is shown only this once."""
    from ..auth import create_key

    owner = owner.strip()
    if not owner or len(owner) > 255:
        raise click.BadParameter("give a name of 1 to 255 characters", param_hint="--owner")
    new = run_on_db(
        _settings(**options),
        lambda db: create_key(
            db, owner=owner, admin=admin, requests_per_minute=rpm, tokens_per_day=tpd
        ),
    )
    click.echo(new.secret)
    kind = "admin key" if admin else "key"
    click.echo(
        f"Created {kind} {new.info.id} for {owner}. Store it now: it is not shown again.",
        err=True,
    )


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


@key.command("list")
@data_options
def key_list(**options: Any) -> None:
    """List every key (never the secrets)."""
    from ..auth import list_keys

    keys = run_on_db(_settings(**options), list_keys)
    if not keys:
        click.echo("No API keys. Create one with `parlour key create --owner NAME`.", err=True)
        return
    rows = [("ID", "PREFIX", "OWNER", "ADMIN", "CREATED (UTC)", "LAST USED", "STATUS")]
    rows += [
        (
            str(k.id),
            k.prefix,
            k.owner,
            "yes" if k.admin else "no",
            _when(k.created_at),
            _when(k.last_used_at),
            f"revoked {_when(k.revoked_at)}" if k.revoked_at else "active",
        )
        for k in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


@key.command("revoke")
@click.argument("ident", metavar="ID")
@data_options
def key_revoke(ident: str, **options: Any) -> None:
    """Revoke a key by the id (or prefix) that `parlour key list` shows."""
    from ..auth import revoke_key
    from ..errors import NotFound

    try:
        info = run_on_db(_settings(**options), lambda db: revoke_key(db, ident))
    except NotFound as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"Revoked key {info.id} of {info.owner}.")


@main.command()
@click.option("--sub", required=True, help="The subject: the owner the token acts for.")
@click.option(
    "--ttl",
    type=click.IntRange(min=1),
    default=3600,
    show_default=True,
    help="Seconds until the token expires.",
)
def token(sub: str, ttl: int) -> None:
    """Print a JWT signed with PARLOUR_JWT_SECRET (for development and tests)."""
    from ..tokens import mint_token

    settings = Settings.from_env()
    if not settings.jwt_secret:
        raise click.ClickException(
            "Set PARLOUR_JWT_SECRET to sign tokens (the server must use the same secret), or "
            "use an API key from `parlour key create`."
        )
    if not sub.strip() or len(sub) > 255:
        raise click.BadParameter("give a subject of 1 to 255 characters", param_hint="--sub")
    click.echo(
        mint_token(
            secret=settings.jwt_secret,
            sub=sub,
            ttl=ttl,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )


@main.command()
@click.option(
    "--session",
    "session_key",
    default=None,
    metavar="KEY",
    help="The session to continue, as an x-session-key of the local owner [cli:<user name>].",
)
@click.option(
    "--bot",
    "bot_ref",
    default=None,
    metavar="SLUG",
    help="Chat with a bot: its system prompt, model, settings and knowledge apply.",
)
@data_options
@_model_options
def chat(session_key: str | None, bot_ref: str | None, **options: Any) -> None:
    """Chat in the terminal through the same engine and store as `serve`, no server needed.

    /new starts a fresh conversation, /help lists the commands, /exit or Ctrl-D quits.
    """
    from .chat import chat as run_chat
    from .chat import check_session_key, default_session_key

    key = check_session_key(session_key if session_key is not None else default_session_key())
    try:
        asyncio.run(run_chat(_settings(**options), session_key=key, bot_ref=bot_ref))
    except KeyboardInterrupt:
        click.echo("", err=True)


key.add_command(key_update)
main.add_command(bot)
main.add_command(kb)
main.add_command(model)
