"""Models pulled from the Hugging Face Hub: GGUF files kept under `<data dir>/models`.

`parlour model pull OWNER/REPO/FILE.gguf` downloads through `huggingface_hub`, which honours
HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE, shows a progress bar and resumes a partial
download; the file is then checked against the hub's SHA-256 (for files stored with Git
LFS, as model weights are) and read as GGUF. Each repository gets a folder
`OWNER--REPO`, so a pulled model is named by its file (`Qwen2.5-0.5B-Instruct-Q4_K_M`,
case-insensitive) or by `OWNER/REPO/FILE.gguf`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequest, NotFound

#: An etag that is a SHA-256: the hub gives one for every file stored with Git LFS.
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's metadata says about its model."""

    title: str | None
    architecture: str | None
    quantisation: str | None
    context_length: int | None
    has_chat_template: bool


@dataclass(frozen=True)
class PulledModel:
    """One pulled GGUF file."""

    repo: str
    file: str
    path: Path

    @property
    def name(self) -> str:
        """The name `serve --model` and the config file take: the file name without .gguf."""
        return self.path.stem

    @property
    def ref(self) -> str:
        """`OWNER/REPO/FILE.gguf`, what `parlour model pull` was given."""
        return f"{self.repo}/{self.file}"

    @property
    def size(self) -> int:
        """Bytes on disk."""
        return self.path.stat().st_size


def split_ref(ref: str) -> tuple[str, str]:
    """`OWNER/REPO/FILE.gguf` as (repository, file), or a 400 saying what to give."""
    parts = ref.strip().strip("/").split("/")
    if len(parts) < 3 or not ref.endswith(".gguf") or any(p in ("", ".", "..") for p in parts):
        raise InvalidRequest(
            f"Give a model as OWNER/REPO/FILE.gguf (like bartowski/Qwen2.5-0.5B-Instruct-GGUF/"
            f"Qwen2.5-0.5B-Instruct-Q4_K_M.gguf), not {ref!r}."
        )
    return "/".join(parts[:2]), "/".join(parts[2:])


def _folder(models_dir: Path, repo: str) -> Path:
    return models_dir / repo.replace("/", "--")


def installed(models_dir: Path) -> list[PulledModel]:
    """Every pulled model, by repository and file."""
    found: list[PulledModel] = []
    if not models_dir.is_dir():
        return found
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir() and "--" in p.name):
        repo = folder.name.replace("--", "/", 1)
        for path in sorted(folder.rglob("*.gguf")):
            relative = path.relative_to(folder)
            if relative.parts[0] != ".cache":  # huggingface_hub's partial downloads
                found.append(PulledModel(repo=repo, file=relative.as_posix(), path=path))
    return found


def find(models_dir: Path, name: str) -> PulledModel | None:
    """The pulled model with this name (file name without .gguf, any case) or reference."""
    wanted = name.strip().lower()
    for model in installed(models_dir):
        if wanted in (model.name.lower(), model.ref.lower(), model.file.lower()):
            return model
    return None


def describe(path: Path) -> GgufInfo:
    """Name, architecture, quantisation, trained context length and template of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)

    def value(key: str) -> object:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    architecture = value("general.architecture")
    file_type = value("general.file_type")
    quantisation: str | None = None
    if isinstance(file_type, int):
        try:
            quantisation = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quantisation = str(file_type)
    context = value(f"{architecture}.context_length") if architecture else None
    title = value("general.name")
    return GgufInfo(
        title=title if isinstance(title, str) else None,
        architecture=architecture if isinstance(architecture, str) else None,
        quantisation=quantisation,
        context_length=context if isinstance(context, int) else None,
        has_chat_template=reader.get_field("tokenizer.chat_template") is not None,
    )


def pull(models_dir: Path, ref: str) -> PulledModel:
    """Download `OWNER/REPO/FILE.gguf` (resuming a partial download), verify it, return it."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    repo, file = split_ref(ref)
    folder = _folder(models_dir, repo)
    # Read here, not when huggingface_hub was imported: the command's own environment wins.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    path = Path(hf_hub_download(repo_id=repo, filename=file, local_dir=folder, endpoint=endpoint))
    if not _offline():
        etag = get_hf_file_metadata(hf_hub_url(repo, file, endpoint=endpoint)).etag or ""
        if _SHA256.match(etag) and _sha256(path) != etag:
            path.unlink(missing_ok=True)
            raise InvalidRequest(
                f"{ref} did not match the hub's SHA-256 and was removed; pull it again."
            )
    try:
        describe(path)
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise InvalidRequest(f"{ref} is not a GGUF file ({exc}); it was removed.") from None
    return PulledModel(repo=repo, file=file, path=path)


def remove(models_dir: Path, name: str) -> PulledModel:
    """Delete a pulled model's file (and its folder once empty)."""
    model = find(models_dir, name)
    if model is None:
        raise NotFound(f"No pulled model {name!r}; `parlour model list` shows them.")
    model.path.unlink()
    folder = _folder(models_dir, model.repo)
    if not any(p for p in folder.rglob("*.gguf") if ".cache" not in p.parts):
        shutil.rmtree(folder, ignore_errors=True)
    return model


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()
