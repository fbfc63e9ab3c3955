"""The `parlour` command line: serve, and the commands that work on the same data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from .settings import Settings


def _settings(**options: Any) -> Settings:
    return Settings.from_env(**options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="parlour")
def main() -> None:
    """parlour: a self-hosted chat server for language models with server-side memory."""


@main.command()
@click.option("--host", default=None, help="Address to listen on [PARLOUR_HOST; 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [PARLOUR_PORT; 8900].")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the database and state live [PARLOUR_DATA_DIR; ~/.local/share/parlour].",
)
@click.option(
    "--database-url",
    default=None,
    help="sqlite+aiosqlite:///… or postgresql+asyncpg://… [PARLOUR_DATABASE_URL; SQLite in "
    "the data directory].",
)
@click.option(
    "--model",
    default=None,
    help="Default model: a configured name, a .gguf path, or `scripted` [PARLOUR_MODEL; the "
    "embedded SmolLM2-135M-Instruct].",
)
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="TOML file declaring models [PARLOUR_CONFIG].",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Allow listening on a non-loopback address without authentication [PARLOUR_INSECURE].",
)
@click.option("--log-level", default="info", show_default=True, help="Logging level.")
def serve(log_level: str, **options: Any) -> None:
    """Start the HTTP server."""
    import uvicorn

    from .app import create_app

    settings = _settings(**options)
    if not settings.is_loopback and not settings.auth_configured and not settings.insecure:
        raise click.ClickException(
            f"Refusing to listen on {settings.host} without authentication: set "
            "PARLOUR_JWT_SECRET (or PARLOUR_JWT_PUBLIC_KEY), or pass --insecure if this "
            "network is trusted."
        )
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=5,
    )
