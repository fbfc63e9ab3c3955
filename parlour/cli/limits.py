"""`parlour key` limit options, `parlour key update`, and metrics set-up for `--workers`."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..ops.metrics import MULTIPROCESS_ENV
from ..settings import Settings
from .admin import data_options, run_on_db


def _limit_option(flag: str, what: str, setting: str) -> Callable[[Any], Any]:
    return click.option(
        flag,
        type=click.IntRange(min=0),
        default=None,
        help=f"{what} for this key [{setting}]; 0 is unlimited.",
    )


def key_limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--rpm and --tpd: a key's own limits (0: unlimited; unset: the server's settings)."""
    tpd = _limit_option(
        "--tpd", "Tokens per day (prompt + completion, UTC days)", "PARLOUR_TOKENS_PER_DAY"
    )
    rpm = _limit_option("--rpm", "Generation requests per minute", "PARLOUR_REQUESTS_PER_MINUTE")
    result: Callable[..., Any] = rpm(tpd(command))
    return result


@click.command("update")
@click.argument("ident", metavar="ID")
@key_limit_options
@data_options
def key_update(ident: str, rpm: int | None, tpd: int | None, **options: Any) -> None:
    """Change a key's limits, by the id (or prefix) that `parlour key list` shows."""
    from ..auth import update_key_limits
    from ..errors import NotFound

    if rpm is None and tpd is None:
        raise click.UsageError("Give --rpm, --tpd or both.")
    try:
        info = run_on_db(
            Settings.from_env(**options),
            lambda db: update_key_limits(db, ident, requests_per_minute=rpm, tokens_per_day=tpd),
        )
    except NotFound as exc:
        raise click.ClickException(exc.message) from None

    def shown(value: int | None) -> str:
        return "server default" if value is None else ("unlimited" if value == 0 else str(value))

    click.echo(
        f"Key {info.id} of {info.owner}: {shown(info.requests_per_minute)} requests per "
        f"minute, {shown(info.tokens_per_day)} tokens per day."
    )


def metrics_multiprocess_env(data_dir: Path) -> dict[str, str]:
    """An empty folder where worker processes keep their metrics, as the variable naming it."""
    folder = data_dir / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    return {MULTIPROCESS_ENV: str(folder)}
