"""The embedded model's weights converted once into the data directory's cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from parlour.backends.base import ChatMessage, GenerationParams
from parlour.backends.convert import cached_path, converted, weight_type
from parlour.backends.llama import LlamaBackend
from parlour.backends.registry import build_registry
from parlour.models import embedded_gguf


def test_weight_type_names() -> None:
    assert weight_type("Q8_0") == "q8_0"
    assert weight_type("none") is None
    assert weight_type(None) is None
    with pytest.raises(ValueError, match="use one of q8_0, bf16, f16, none"):
        weight_type("q4_1")


def test_embedded_model_converts_by_default_and_named_files_do_not(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"")
    config = tmp_path / "models.toml"
    config.write_text(
        '[[models]]\nname = "fast"\nbackend = "llama"\nweights = "bf16"\n'
        f'[[models]]\nname = "own"\nbackend = "llama"\npath = "{gguf}"\n'
    )
    registry = build_registry(
        model="smollm2", config=config, strict=True, cache_dir=tmp_path / "cache"
    )
    backends = {m.spec.name: m.backend for m in registry.models}
    assert isinstance(embedded := backends["smollm2-135m-instruct"], LlamaBackend)
    assert (embedded.weights, embedded.cache_dir) == ("q8_0", tmp_path / "cache")
    assert isinstance(fast := backends["fast"], LlamaBackend)
    assert fast.weights == "bf16"
    assert isinstance(own := backends["own"], LlamaBackend)
    assert own.weights is None


@pytest.mark.model
def test_conversion_is_cached_and_leaves_no_temp_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    leftover = cache / f".{embedded_gguf().stem}.q8_0.0123456789abcdef.gguf.{dead}.tmp"
    leftover.write_bytes(b"half a file")
    stale = cache / f"{embedded_gguf().stem}.q8_0.0000000000000000.gguf"
    stale.write_bytes(b"from an older wheel")

    path = converted(embedded_gguf(), cache, "q8_0")
    assert path == cached_path(embedded_gguf(), cache, "q8_0")
    assert path.read_bytes()[:4] == b"GGUF"
    written = path.stat().st_mtime_ns
    assert converted(embedded_gguf(), cache, "q8_0") == path
    assert path.stat().st_mtime_ns == written
    assert sorted(cache.iterdir()) == [path]


@pytest.mark.model
async def test_backend_loads_the_converted_copy_and_answers(tmp_path: Path) -> None:
    backend = LlamaBackend(path=embedded_gguf(), weights="q8_0", cache_dir=tmp_path)
    await backend.load()
    try:
        assert backend.loaded_path == cached_path(embedded_gguf(), tmp_path, "q8_0")
        params = GenerationParams(max_tokens=16, temperature=0)
        ask = [ChatMessage("user", "Say hello.")]
        chunks = [c async for c in backend.stream(ask, params)]
        assert "".join(c.text for c in chunks).strip()
        assert chunks[-1].finish_reason in ("stop", "length")
    finally:
        await backend.close()


@pytest.mark.model
async def test_failed_conversion_falls_back_to_the_original(tmp_path: Path) -> None:
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be")
    backend = LlamaBackend(path=embedded_gguf(), weights="q8_0", cache_dir=blocked)
    await backend.load()
    try:
        assert backend.loaded_path == embedded_gguf()
        assert backend.ready
    finally:
        await backend.close()


@pytest.mark.model
async def test_unloadable_cached_copy_is_removed_and_the_original_loaded(tmp_path: Path) -> None:
    broken = cached_path(embedded_gguf(), tmp_path, "q8_0")
    broken.write_bytes(b"GGUF but nothing else")
    backend = LlamaBackend(path=embedded_gguf(), weights="q8_0", cache_dir=tmp_path)
    await backend.load()
    try:
        assert backend.loaded_path == embedded_gguf()
        assert not broken.exists()
    finally:
        await backend.close()
