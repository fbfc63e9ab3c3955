"""Weights converted once to a type llama.cpp's fast CPU kernels cover, cached on disk.

llama.cpp evaluates prompt batches through tinyBLAS (llamafile's sgemm) only for
F32, F16, BF16, Q8_0 and a few 4/5-bit block types; Q4_1, the embedded model's type,
falls back to one dot product per row and token, about half as fast. Converting the
weights with `llama_model_quantize` takes about a second for a small model; the result
is kept next to parlour's other data and reused while the source file is unchanged.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..files import process_alive

log = logging.getLogger(__name__)

#: Target weight types: (llama_ftype, type of the token embedding / tied output matrix,
#: None to follow the ftype). The embedding matrix takes part in a prompt batch only for
#: the last token's logits, so 16-bit types keep it at Q8_0, which is faster per token.
WEIGHT_TYPES: dict[str, tuple[int, int | None]] = {
    "q8_0": (7, None),  # LLAMA_FTYPE_MOSTLY_Q8_0
    "bf16": (32, 8),  # LLAMA_FTYPE_MOSTLY_BF16, embedding GGML_TYPE_Q8_0
    "f16": (1, 8),  # LLAMA_FTYPE_MOSTLY_F16, embedding GGML_TYPE_Q8_0
}


def weight_type(value: object) -> str | None:
    """A validated target type from configuration; None (or "none") keeps the file as it is."""
    if value is None or value == "none":
        return None
    if not isinstance(value, str) or value.lower() not in WEIGHT_TYPES:
        choices = ", ".join([*WEIGHT_TYPES, "none"])
        raise ValueError(f"unknown weights type {value!r}: use one of {choices}")
    return value.lower()


def cached_path(source: Path, cache_dir: Path, weights: str) -> Path:
    """Where the converted copy of `source` lives; the name changes when the source does."""
    import llama_cpp

    stat = source.stat()
    parts = (source.resolve(), stat.st_size, stat.st_mtime_ns, weights, llama_cpp.__version__)
    key = "\0".join(str(part) for part in parts)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"{source.stem}.{weights}.{digest}.gguf"


def converted(source: Path, cache_dir: Path, weights: str, *, threads: int = 1) -> Path:
    """The converted copy of `source`, made now (atomically) unless already cached."""
    import llama_cpp

    ftype, embedding = WEIGHT_TYPES[weights]
    target = cached_path(source, cache_dir, weights)
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(cache_dir, source, weights, keep=target)
    temp = cache_dir / f".{target.name}.{os.getpid()}.tmp"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    if embedding is not None:
        params.token_embedding_type = embedding
        params.output_tensor_type = embedding
    try:
        with _quiet_llama_log():
            code = llama_cpp.llama_model_quantize(
                str(source).encode(), str(temp).encode(), ctypes.byref(params)
            )
        if code != 0:
            raise RuntimeError(f"llama_model_quantize returned {code}")
        with temp.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)  # readers see the whole file or none
    finally:
        temp.unlink(missing_ok=True)
    log.info("converted %s to %s in %s", source.name, weights, target)
    return target


def _remove_leftovers(cache_dir: Path, source: Path, weights: str, *, keep: Path) -> None:
    """Drop copies of an older version of the source and temp files of dead processes."""
    stale = [old for old in cache_dir.glob(f"{source.stem}.{weights}.*.gguf") if old != keep]
    for temp in cache_dir.glob(f".{source.stem}.*.tmp"):
        pid = temp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            stale.append(temp)
    for path in stale:
        with suppress(OSError):  # e.g. still open by another process on Windows
            path.unlink()


@contextmanager
def _quiet_llama_log() -> Iterator[None]:
    """Keep llama.cpp's per-tensor progress lines out of the server's output."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
