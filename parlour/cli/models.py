"""`parlour model pull|list|remove`: GGUF models from the Hugging Face Hub in the data directory."""

from __future__ import annotations

from pathlib import Path

import click

from .. import pulled
from ..settings import Settings
from .admin import core_errors


def _models_dir(data_dir: Path | None) -> Path:
    return Settings.from_env(data_dir=data_dir).models_dir


_data_dir = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The data directory `serve` uses [PARLOUR_DATA_DIR; ~/.local/share/parlour].",
)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover


@click.group()
def model() -> None:
    """Pull GGUF models from the Hugging Face Hub, list and remove them."""


@model.command("pull")
@click.argument("ref")
@_data_dir
def model_pull(ref: str, data_dir: Path | None) -> None:
    """Download OWNER/REPO/FILE.gguf (honours HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        with core_errors():
            found = pulled.pull(_models_dir(data_dir), ref)
    except LocalEntryNotFoundError as exc:
        raise click.ClickException(
            f"Could not download {ref}: {exc}. Check the network, or unset HF_HUB_OFFLINE."
        ) from None
    except HfHubHTTPError as exc:
        raise click.ClickException(
            f"Could not download {ref}: {exc}. Check OWNER/REPO/FILE.gguf, and set HF_TOKEN "
            "for gated or private repositories."
        ) from None
    info = pulled.describe(found.path)
    click.echo(f"Pulled {found.ref} ({_size(found.size)}) as {found.name}.", err=True)
    if not info.has_chat_template:
        click.echo("It has no chat template; parlour will use ChatML.", err=True)
    click.echo(f"Serve it with: parlour serve --model {found.name}", err=True)


@model.command("list")
@_data_dir
def model_list(data_dir: Path | None) -> None:
    """The pulled models: name, repository, size, quantisation and trained context."""
    models = pulled.installed(_models_dir(data_dir))
    if not models:
        click.echo("No models pulled yet; try `parlour model pull OWNER/REPO/FILE.gguf`.", err=True)
        return
    rows = [("NAME", "REPOSITORY", "SIZE", "QUANT", "CONTEXT", "TITLE")]
    for found in models:
        info = pulled.describe(found.path)
        rows.append(
            (
                found.name,
                found.repo,
                _size(found.size),
                info.quantisation or "-",
                str(info.context_length or "-"),
                info.title or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]))


@model.command("remove")
@click.argument("name")
@_data_dir
def model_remove(name: str, data_dir: Path | None) -> None:
    """Delete a pulled model (by name or OWNER/REPO/FILE.gguf)."""
    with core_errors():
        removed = pulled.remove(_models_dir(data_dir), name)
    click.echo(f"Removed {removed.ref}.", err=True)
