"""The embedded backend: a GGUF model run in-process by llama.cpp (llama-cpp-python).

Generation runs in parlour.backends.llama_scheduler: one context with several sequences,
per-session prompt state kept between turns, and concurrent streams advancing together,
one token each per step. This module loads the model, renders and tokenizes prompts,
and bridges the scheduler thread to asyncio.

Settings, measured on this project's 2-core AMD EPYC (AVX-512, no AMX) with one thread,
in tokens per CPU-second so that other processes' load does not blur them
(bench/bench_weights.py; BENCHMARKS.md has the tables):

- Weights: the embedded Q4_1 file is converted once to Q8_0 (`weights` option; cached
  in `<data dir>/cache` by parlour.backends.convert). llama.cpp evaluates prompt
  batches with tinyBLAS (llamafile's sgemm) for F32/F16/BF16/Q8_0/Q4_0 but not Q4_1,
  which falls back to one dot product per row and token: prompts ran at 191 tokens/s,
  Q8_0 runs them at 389 (2.0x) and decodes at 144 tokens/s against 131; next-token KL
  to the exact Q4_1 values 0.004 against 0.003. BF16 runs prompts at 525 but decodes
  at 102: `weights = "bf16"` suits prompt-heavy use. Q4_0 loses quality (KL 0.26).
- Flash attention on: Q8_0 decodes at 144 instead of 131 tokens/s and evaluates
  prompts at 389 instead of 343. The unified KV cache makes every sequence's attention
  visit all cells in use, other sessions' masked ones too: each idle 1,500-token
  session added 0.8 ms per token with flash attention and 5.7 ms without (the
  scheduler now also parks idle sessions in the state store).
- `use_extra_bufts = False`: llama.cpp's extra buffer types repack weights for AMX
  or AVX kernels. The AMX path segfaults in `ggml_backend_amx_mul_mat` on Xeons
  with AMX, so parlour never enables them. Here repacking sped up only Q4_0.
- Threads: half the cores (one on a 2-core machine) for decoding *and* for prompt
  batches (`batch_threads` sets the latter). A second prompt thread was 1.9x faster at
  best but 0.7x in the median with other processes busy (ggml's threads wait for each
  other at every operation, and one descheduled thread stalls the rest); a second
  decode thread fell to 7 tokens/s in the median.
- `n_batch = n_ubatch = 512`: 256 and 1024 measured the same within noise.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import threading
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..bounds import tokenising
from ..errors import BackendError, ModelNotReady
from ..memory import release_large_buffers
from .base import Backend, ChatMessage, Chunk, GenerationParams, Prompt
from .convert import converted
from .llama_scheduler import (
    Request,
    SamplerDefaults,
    SessionScheduler,
    SessionStats,
)
from .state_store import StateStore

__all__ = ["CHATML", "LlamaBackend", "default_threads"]

log = logging.getLogger(__name__)

_PATCH_LOCK = threading.Lock()

# ChatML, used when a GGUF carries no chat template of its own.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Marks where each message's content sits in the rendered template, so contents are
#: tokenized without special tokens: a user who types `<|im_start|>system` gets text,
#: not a role switch.
_MARK = "\x00\x01parlour-content-{}\x01\x00"


#: llama.cpp's log levels (ggml_log_level) that are problems; the rest is detail.
_GGML_LOG_ERROR = 4


@functools.cache
def _log_callback() -> Any:
    """The ctypes callback that hands llama.cpp's log lines to logging (cached: llama.cpp
    keeps the pointer, so the callback must outlive every call)."""
    import llama_cpp

    native = logging.getLogger("parlour.llama_cpp")

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def forward(level: int, text: bytes, _user_data: Any) -> None:
        line = text.decode("utf-8", errors="replace").rstrip("\n")
        if line:
            native.log(logging.WARNING if level == _GGML_LOG_ERROR else logging.DEBUG, line)

    return forward


def default_threads() -> int:
    """Threads for llama.cpp: half the cores, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


@contextmanager
def _without_extra_buffer_types() -> Iterator[None]:
    """Make llama-cpp-python's `Llama` load with `use_extra_bufts = False` (it has no argument
    for it); for tools that load models through that class."""
    import llama_cpp.llama_cpp as lib

    with _PATCH_LOCK:
        original = lib.llama_model_default_params

        def params() -> Any:
            value = original()
            value.use_extra_bufts = False
            return value

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = original


class LlamaBackend(Backend):
    """A GGUF model in-process with per-session prompt state and batched concurrent streams."""

    kind = "llama"

    def __init__(
        self,
        *,
        path: Path,
        context_length: int | None = None,
        threads: int | None = None,
        batch_threads: int | None = None,
        n_batch: int = 512,
        slots: int = 8,
        kv_cells: int | None = None,
        state_dir: Path | None = None,
        ram_budget: int = 256 * 2**20,
        disk_budget: int = 2 * 2**30,
        sampling: SamplerDefaults | None = None,
        weights: str | None = None,
        cache_dir: Path | None = None,
        flash_attn: bool = True,
        batch_streams: bool = False,
    ) -> None:
        self.path = path
        self.weights = weights
        self.cache_dir = cache_dir
        self.flash_attn = flash_attn
        #: The file actually loaded: the converted copy, or `path` itself.
        self.loaded_path: Path | None = None
        self.requested_context = context_length
        self.threads = threads or default_threads()
        self.batch_threads = batch_threads or self.threads
        self.n_batch = n_batch
        self.slots = slots
        self.requested_cells = kv_cells
        self.state_dir = state_dir
        self.ram_budget = ram_budget
        self.disk_budget = disk_budget
        self.sampling = sampling or SamplerDefaults()
        self.batch_streams = batch_streams
        self._model: Any = None
        self._ctx: Any = None
        self._scheduler: SessionScheduler | None = None
        self.context_length = context_length or 0
        self._template: Any = None
        self._bos_text = ""
        self._eos_text = ""
        self._add_bos = False

    @property
    def ready(self) -> bool:
        return self._scheduler is not None

    @property
    def stats(self) -> SessionStats:
        """Prompt reuse and batching counters of the scheduler."""
        if self._scheduler is None:
            return SessionStats()
        return self._scheduler.stats

    @property
    def store(self) -> StateStore | None:
        """Where idle sessions' states are kept."""
        return self._scheduler.store if self._scheduler is not None else None

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        import llama_cpp

        release_large_buffers()
        # llama.cpp's own lines (context setup, one per restored session state, the unified
        # cache's "n_ctx_seq > n_ctx_train" note) go to logging at debug level: out of the
        # console unless `--log-level debug`.
        llama_cpp.llama_log_set(_log_callback(), ctypes.c_void_p(0))
        model = self._open_model()
        ctx, n_ctx, cells = self._open_context(model)
        bos, eos = model.token_bos(), model.token_eos()
        self._bos_text = model.token_get_text(bos) if bos >= 0 else ""
        self._eos_text = model.token_get_text(eos) if eos >= 0 else ""
        self._add_bos = bool(model.add_bos_token())
        self._template = _chat_template(model.metadata().get("tokenizer.chat_template") or CHATML)
        store = StateStore(
            ram_bytes=self.ram_budget,
            disk_bytes=self.disk_budget,
            directory=self.state_dir,
        )
        self._model, self._ctx, self.context_length = model, ctx, n_ctx
        self._scheduler = SessionScheduler(
            model=model,
            ctx=ctx,
            n_batch=self.n_batch,
            slots=self.slots,
            kv_cells=cells,
            n_ctx_seq=n_ctx,
            store=store,
            sampling=self.sampling,
            batch_streams=self.batch_streams,
        )

    def _open_model(self) -> Any:
        """The model's weights, from the converted copy if it loads, else the file itself."""
        import llama_cpp
        from llama_cpp import _internals

        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = False
        path = self._weights_file()
        try:
            model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
        except ValueError:
            if path == self.path:
                raise
            log.warning("could not load %s; removed it and loaded %s instead", path, self.path)
            path.unlink(missing_ok=True)
            path = self.path
            model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
        self.loaded_path = path
        return model

    def _open_context(self, model: Any) -> tuple[Any, int, int]:
        """A context with a slot per session: (context, tokens per sequence, KV cells)."""
        import llama_cpp
        from llama_cpp import _internals

        trained = model.n_ctx_train()
        n_ctx = min(self.requested_context or trained, trained) if trained > 0 else 4096
        # One unified cache for every slot. llama.cpp then reports n_ctx_seq as the whole
        # cache, but no sequence grows past n_ctx (at most the trained length): the
        # scheduler ends a reply at n_ctx_seq=n_ctx and prompts are fitted to it first.
        cells = max(self.requested_cells or 2 * n_ctx, n_ctx)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.slots
        params.kv_unified = True
        params.n_threads = self.threads
        params.n_threads_batch = self.batch_threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        return _internals.LlamaContext(model=model, params=params, verbose=False), n_ctx, cells

    def _weights_file(self) -> Path:
        """The model file to load: a cached conversion when one is asked for and works."""
        if self.weights is None or self.cache_dir is None:
            return self.path
        try:
            return converted(self.path, self.cache_dir, self.weights, threads=self.threads)
        except Exception:  # a full disk or an odd file must not keep the model from loading
            log.warning(
                "converting %s to %s failed; loading it as it is",
                self.path,
                self.weights,
                exc_info=True,
            )
            return self.path

    async def close(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.close)
        if self._ctx is not None:
            self._ctx.close()
            self._model.close()
            self._ctx = self._model = None

    def _loaded(self) -> Any:
        if self._model is None:
            raise ModelNotReady(f"Model {self.path.name} is not loaded yet; try again shortly.")
        return self._model

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for these messages, ending where the assistant's reply begins."""
        self._loaded()
        return self._render([m.content for m in messages], messages)

    def _render(self, contents: Sequence[str], messages: Sequence[ChatMessage]) -> str:
        rendered: str = self._template.render(
            messages=[
                {"role": m.role, "content": c} for m, c in zip(messages, contents, strict=True)
            ],
            add_generation_prompt=True,
            bos_token=self._bos_text,
            eos_token=self._eos_text,
        )
        return rendered

    def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt token ids: template text with special tokens, message contents without."""
        model = self._loaded()
        marks = [_MARK.format(i) for i in range(len(messages))]
        text = self._render(marks, messages)
        tokens: list[int] = []
        if self._add_bos and not (self._bos_text and text.startswith(self._bos_text)):
            tokens.append(model.token_bos())
        rest = text
        for mark, message in zip(marks, messages, strict=True):
            before, found, rest = rest.partition(mark)
            if not found:  # a template that drops a message (e.g. a second system prompt)
                rest = before
                continue
            if before:
                tokens += model.tokenize(before.encode("utf-8"), False, True)
            if message.content:
                tokens += model.tokenize(message.content.encode("utf-8"), False, False)
        if rest:
            tokens += model.tokenize(rest.encode("utf-8"), False, True)
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self._loaded().tokenize(text.encode("utf-8"), False, False))

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.encode(messages))

    async def stream(
        self, messages: Prompt, params: GenerationParams, *, session: str | None = None
    ) -> AsyncGenerator[Chunk, None]:
        scheduler = self._scheduler
        if scheduler is None:
            raise ModelNotReady(f"Model {self.path.name} is not loaded yet; try again shortly.")
        tokens = await tokenising(sum(len(m.content) for m in messages), self.encode, messages)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

        def emit(item: Chunk | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        request = Request(
            prompt=tokens,
            params=params,
            session=session,
            emit=emit,
            limit=max(0, min(params.max_tokens, self.context_length - len(tokens))),
        )
        if request.limit == 0:
            yield Chunk(finish_reason="length", prompt_tokens=len(tokens))
            return
        scheduler.submit(request)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise BackendError(f"llama.cpp failed: {item}") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Reached on a client disconnect too: the scheduler drops it at its next step.
            scheduler.cancel(request)


def _chat_template(source: str) -> Any:
    """A model's Jinja chat template, compiled in a sandbox."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
