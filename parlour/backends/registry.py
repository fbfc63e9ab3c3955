"""The backend table: each kind of backend and how a model spec builds it; the config loader."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..models import (
    LoadedModel,
    ModelRegistry,
    ModelSpec,
    embedded_gguf,
    embedded_spec,
    resolve_spec,
    spec_from_argument,
)
from ..settings import Settings
from .base import Backend


@dataclass(frozen=True)
class BuildOptions:
    """Server-wide settings a backend may use."""

    threads: int | None = None
    state_dir: Path | None = None
    cache_dir: Path | None = None


def _scripted(spec: ModelSpec, options: BuildOptions) -> Backend:
    from .scripted import ScriptedBackend

    return ScriptedBackend(
        context_length=spec.context_length or 4096,
        token_delay=float(spec.options.get("token_delay", 0.0)),
    )


def _llama(spec: ModelSpec, options: BuildOptions) -> Backend:
    from .convert import weight_type
    from .llama import LlamaBackend

    extra = spec.options
    # The embedded Q4_1 file is converted to Q8_0 (prompts ~2x faster, see
    # BENCHMARKS.md); a GGUF the user names is loaded as it is unless configured.
    weights = weight_type(extra.get("weights", "q8_0" if spec.path is None else None))
    return LlamaBackend(
        path=spec.path or embedded_gguf(),
        context_length=spec.context_length,
        threads=spec.threads or options.threads,
        batch_threads=extra.get("batch_threads"),
        slots=int(extra.get("slots", 8)),
        kv_cells=extra.get("kv_cells"),
        state_dir=options.state_dir / spec.name if options.state_dir is not None else None,
        ram_budget=int(extra.get("state_ram_mb", 256)) * 2**20,
        disk_budget=int(extra.get("state_disk_mb", 2048)) * 2**20,
        weights=weights,
        cache_dir=options.cache_dir,
        flash_attn=bool(extra.get("flash_attn", True)),
        batch_streams=bool(extra.get("batch_streams", False)),
    )


def _openai(spec: ModelSpec, options: BuildOptions) -> Backend:
    from .openai import OpenAIBackend

    urls = spec.options.get("base_urls") or spec.options.get("base_url")
    if isinstance(urls, str):
        urls = [urls]
    if not urls or not all(isinstance(u, str) for u in urls):
        raise ValueError(f"model {spec.name!r}: the openai backend needs base_url or base_urls")
    return OpenAIBackend(
        base_urls=urls,
        model=str(spec.options.get("upstream_model") or spec.name),
        api_key_env=spec.options.get("api_key_env"),
        context_length=spec.context_length or 8192,
        connect_timeout=float(spec.options.get("connect_timeout", 5.0)),
        read_timeout=float(spec.options.get("read_timeout", 120.0)),
    )


#: Every kind of backend a model spec may name, and how it is built (not loaded).
BACKENDS: dict[str, Callable[[ModelSpec, BuildOptions], Backend]] = {
    "llama": _llama,
    "openai": _openai,
    "scripted": _scripted,
}


def build_backend(
    spec: ModelSpec,
    *,
    threads: int | None = None,
    state_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> Backend:
    """Construct (but do not load) the backend for a spec."""
    factory = BACKENDS.get(spec.backend)
    if factory is None:
        raise ValueError(f"model {spec.name!r}: the {spec.backend!r} backend is not available")
    return factory(spec, BuildOptions(threads=threads, state_dir=state_dir, cache_dir=cache_dir))


def load_config(path: Path) -> tuple[list[ModelSpec], str | None]:
    """Read `[[models]]` tables and an optional top-level `default` from a TOML file."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    specs: list[ModelSpec] = []
    for entry in data.get("models", []):
        entry = dict(entry)
        name = entry.pop("name", None)
        backend = entry.pop("backend", "llama")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: every [[models]] entry needs a name")
        if backend not in BACKENDS:
            raise ValueError(f"{path}: model {name!r} has unknown backend {backend!r}")
        raw_path = entry.pop("path", None)
        specs.append(
            ModelSpec(
                name=name,
                backend=backend,
                aliases=tuple(entry.pop("aliases", ())),
                path=Path(raw_path).expanduser() if raw_path else None,
                context_length=entry.pop("context_length", None),
                max_tokens=int(entry.pop("max_tokens", 512)),
                threads=entry.pop("threads", None),
                options=entry,
            )
        )
    default = data.get("default")
    return specs, default if isinstance(default, str) else None


def build_registry(
    *,
    model: str | None,
    config: Path | None,
    strict: bool,
    threads: int | None = None,
    state_dir: Path | None = None,
    cache_dir: Path | None = None,
    models_dir: Path | None = None,
) -> ModelRegistry:
    """Models from the config file plus the one named by --model (default: the embedded one);
    `models_dir` holds pulled models, which both may name."""
    specs: list[ModelSpec] = []
    default: str | None = None
    if config is not None:
        specs, default = load_config(config)
        specs = [resolve_spec(s, models_dir) for s in specs]
    names = {n for s in specs for n in s.names}
    if model is not None:
        if model in names:
            default = model
        else:
            extra = spec_from_argument(model, models_dir)
            specs.insert(0, extra)
            default = extra.name
    if not specs:
        specs = [embedded_spec()]
    default = default or specs[0].name
    now = int(time.time())
    loaded = [
        LoadedModel(
            spec=s,
            backend=build_backend(s, threads=threads, state_dir=state_dir, cache_dir=cache_dir),
            created=now,
        )
        for s in specs
    ]
    return ModelRegistry(loaded, default=default, strict=strict)


def registry_for(settings: Settings) -> ModelRegistry:
    """The models `serve` and `chat` use with these settings."""
    return build_registry(
        model=settings.model,
        config=settings.config,
        strict=settings.strict_models,
        threads=settings.llama_threads,
        state_dir=settings.data_dir / "state",
        cache_dir=settings.cache_dir,
        models_dir=settings.models_dir,
    )
