"""The embedded backend: a GGUF model run in-process by llama.cpp (llama-cpp-python).

Settings chosen for CPUs, measured on a 2-core Xeon/EPYC (see BENCHMARKS.md):

- `use_extra_bufts = False`: llama.cpp's extra buffer types repack weights for AMX
  or AVX kernels. The AMX path segfaults in `ggml_backend_amx_mul_mat` on Xeons
  with AMX, and the repacked kernels do not cover Q4_1 (the embedded model's
  type) anyway, so turning them off costs nothing here and is safe everywhere.
- One decode thread: decoding a 135M model is bound by memory and per-token
  overhead; a second thread gave no gain and contends with the server's own
  thread. Prompt evaluation (`n_threads_batch`) uses every core.
- `n_batch = n_ubatch = 512`: prompts evaluate in large batches; smaller
  micro-batches were slower.
- All llama.cpp calls that touch the context run on one dedicated thread, so the
  event loop never blocks; an asyncio.Lock (FIFO) queues requests fairly.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendError, ModelNotReady
from .base import Backend, ChatMessage, Chunk, FinishReason, GenerationParams

_PATCH_LOCK = threading.Lock()

# ChatML, used when a GGUF carries no chat template of its own.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@contextmanager
def _without_extra_buffer_types() -> Iterator[None]:
    """Load models with `use_extra_bufts = False`; llama-cpp-python has no argument for it."""
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


class StopScanner:
    """Finds stop strings across chunk boundaries, holding back text that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:size]):
                    keep = max(keep, size)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        """Whatever was held back, at the end of generation."""
        out, self.pending = self.pending, ""
        return out


@dataclass
class LlamaStats:
    """Counters for benchmarks and tests: how much prompt work was done or saved."""

    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    completion_tokens: int = 0
    generations: int = 0


class LlamaBackend(Backend):
    """A GGUF model in-process; one generation at a time, queued in arrival order."""

    kind = "llama"
    exact_tokens = True

    def __init__(
        self,
        *,
        path: Path,
        context_length: int | None = None,
        threads: int | None = None,
        batch_threads: int | None = None,
        n_batch: int = 512,
        flash_attn: bool = False,
        default_temperature: float = 0.2,
        default_top_p: float = 0.9,
        repeat_penalty: float = 1.1,
    ) -> None:
        self.path = path
        self.requested_context = context_length
        self.threads = threads or 1
        self.batch_threads = batch_threads or threads or (os.cpu_count() or 1)
        self.n_batch = n_batch
        self.flash_attn = flash_attn
        self.default_temperature = default_temperature
        self.default_top_p = default_top_p
        self.repeat_penalty = repeat_penalty
        self.stats = LlamaStats()
        self._llm: Any = None
        self._n_ctx = context_length or 0
        self._template: Any = None
        self._bos_text = ""
        self._eos_text = ""
        self._add_bos = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._lock = asyncio.Lock()

    @property
    def context_length(self) -> int:
        return self._n_ctx

    @property
    def ready(self) -> bool:
        return self._llm is not None

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from llama_cpp import Llama

        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        with _without_extra_buffer_types():
            llm = Llama(
                model_path=str(self.path),
                n_ctx=self.requested_context or 0,
                n_batch=self.n_batch,
                n_ubatch=self.n_batch,
                n_threads=self.threads,
                n_threads_batch=self.batch_threads,
                flash_attn=self.flash_attn,
                verbose=False,
            )
        model = llm._model
        self._bos_text = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
        self._eos_text = model.token_get_text(model.token_eos()) if model.token_eos() >= 0 else ""
        self._add_bos = bool(model.add_bos_token())
        source = llm.metadata.get("tokenizer.chat_template") or CHATML
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self._n_ctx = llm.n_ctx()
        self._llm = llm

    async def close(self) -> None:
        async with self._lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, llm.close)
        self._executor.shutdown(wait=False)

    def _model(self) -> Any:
        if self._llm is None:
            raise ModelNotReady(f"Model {self.path.name} is not loaded yet; try again shortly.")
        return self._llm

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for these messages, ending where the assistant's reply begins."""
        self._model()
        rendered: str = self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=self._bos_text,
            eos_token=self._eos_text,
        )
        return rendered

    def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt token ids for these messages."""
        text = self.render(messages)
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        tokens: list[int] = self._model().tokenize(text.encode("utf-8"), add_bos, True)
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self._model().tokenize(text.encode("utf-8"), False, False))

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.encode(messages))

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        session: str | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        tokens = self.encode(messages)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Chunk | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        async with self._lock:
            job = loop.run_in_executor(self._executor, self._generate, tokens, params, cancel, emit)
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise BackendError(f"llama.cpp failed: {item}") from item
                    yield item
                    if item.finish_reason is not None:
                        break
            finally:
                # Reached on a client disconnect too: the thread stops after its current token.
                cancel.set()
                await asyncio.shield(job)

    def _generate(
        self,
        tokens: list[int],
        params: GenerationParams,
        cancel: threading.Event,
        emit: Callable[[Chunk | BaseException], None],
    ) -> None:
        try:
            self._generate_tokens(tokens, params, cancel, emit)
        except Exception as exc:
            emit(exc)

    def _generate_tokens(
        self,
        tokens: list[int],
        params: GenerationParams,
        cancel: threading.Event,
        emit: Callable[[Chunk | BaseException], None],
    ) -> None:
        import llama_cpp

        llm = self._model()
        cached = llm.input_ids[: llm.n_tokens].tolist()
        reused = 0
        for a, b in zip(cached, tokens, strict=False):
            if a != b:
                break
            reused += 1
        reused = min(reused, len(tokens) - 1)
        self.stats.prompt_tokens_reused += reused
        self.stats.prompt_tokens_evaluated += len(tokens) - reused
        self.stats.generations += 1

        llm.set_seed(params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        temperature = (
            params.temperature if params.temperature is not None else self.default_temperature
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(params.stop)
        vocab = llm._model.vocab
        limit = min(params.max_tokens, self._n_ctx - len(tokens))
        finish: FinishReason = "length" if limit <= 0 else "stop"
        produced = 0
        if limit > 0:
            for token in llm.generate(
                tokens,
                temp=temperature,
                top_p=params.top_p if params.top_p is not None else self.default_top_p,
                repeat_penalty=self.repeat_penalty,
                presence_penalty=params.presence_penalty or 0.0,
                frequency_penalty=params.frequency_penalty or 0.0,
            ):
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                produced += 1
                text = decoder.decode(llm.detokenize([token]))
                out, stopped = scanner.feed(text)
                if out:
                    emit(Chunk(text=out))
                if stopped:
                    break
                if produced >= limit:
                    finish = "length"
                    break
        if finish != "cancelled":
            tail, stopped = scanner.feed(decoder.decode(b"", final=True))
            tail += "" if stopped else scanner.flush()
            if tail:
                emit(Chunk(text=tail))
        self.stats.completion_tokens += produced
        emit(
            Chunk(
                finish_reason=finish,
                prompt_tokens=len(tokens),
                completion_tokens=produced,
            )
        )
