"""The embedded model's scheduler: per-session prompt state and fair turns for concurrent streams.

One llama.cpp context holds several sequences ("slots") in a unified KV cache. Each
conversation keeps its evaluated tokens between turns, so a follow-up prefills only
its new tokens, even when other conversations ran in between. Idle conversations are
saved (`llama_state_seq_get_data`) to a StateStore, RAM up to a budget, then disk up
to a budget, oldest dropped first, and restored on their next turn.

A scheduler thread makes every llama.cpp call. Each step gives every decoding stream
its next token and every stream still reading its prompt a chunk (sharing the batch
size), so concurrent streams advance together, token by token, and a long prompt
never stalls the others for more than one chunk. Streams take turns with one decode
each by default; `batch_streams` puts them all in one `llama_decode` instead (see
SessionScheduler for why turns are the default on CPUs).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import Chunk, FinishReason, GenerationParams
from .decoding import StopScanner, common_prefix
from .state_store import StateStore

log = logging.getLogger(__name__)

Emit = Callable[[Chunk | BaseException], None]
#: Names the scheduler gives the states of requests that came without a session.
PREFIX_SESSION = "\x00prefix:"
#: Fewest shared tokens worth reusing a session-less state for.
MIN_PREFIX = 16
#: A request, the tokens it adds to a batch, and whether it wants logits for the last one.
Item = tuple["Request", list[int], bool]


@dataclass
class SessionStats:
    """Counters that tests and benchmarks read."""

    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    completion_tokens: int = 0
    generations: int = 0
    restored_from_ram: int = 0
    restored_from_disk: int = 0
    saved: int = 0
    dropped: int = 0
    batches: int = 0
    #: Most decoding streams that shared one llama_decode.
    max_streams_in_batch: int = 0


@dataclass
class Slot:
    """One sequence of the shared context and whose tokens it holds."""

    seq: int
    session: str | None = None
    tokens: list[int] = field(default_factory=list)
    request: Request | None = None
    last_used: float = 0.0


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


@dataclass(eq=False, kw_only=True)
class Request:
    """One generation as the scheduler tracks it: what was asked, then how far it got."""

    prompt: list[int]
    params: GenerationParams
    session: str | None
    emit: Emit
    limit: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    pending: list[int] = field(default_factory=list)
    last_token: int | None = None
    produced: int = 0
    #: Prompt tokens taken from the session's state instead of evaluated.
    reused: int = 0
    sampler: Any = None
    slot: Slot | None = None
    decoder: codecs.IncrementalDecoder = field(default_factory=_utf8_decoder)
    scanner: StopScanner = field(init=False)

    def __post_init__(self) -> None:
        self.scanner = StopScanner(self.params.stop)


@dataclass(frozen=True)
class SamplerDefaults:
    """The backend's values for sampling parameters a request leaves open."""

    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    penalty_last_n: int = 64


class SessionScheduler:
    """Owns a llama.cpp context with `slots` sequences; runs every call on its own thread."""

    def __init__(
        self,
        *,
        model: Any,
        ctx: Any,
        n_batch: int,
        slots: int,
        kv_cells: int,
        n_ctx_seq: int,
        store: StateStore,
        sampling: SamplerDefaults,
        batch_streams: bool = False,
    ) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.model = model
        self.ctx = ctx
        self.n_batch = n_batch
        self.kv_cells = kv_cells
        self.n_ctx_seq = n_ctx_seq
        self.store = store
        self.sampling = sampling
        # One llama_decode for all streams, or one per stream. On the CPUs measured
        # (BENCHMARKS.md) a step of 4 streams in one batch cost 5-6x a one-stream step
        # while 4 one-token decodes cost 4x, so streams take turns, one token each, by
        # default; batching pays off where multi-token batches are cheap (GPUs).
        self.batch_streams = batch_streams
        self.stats = SessionStats()
        self.slots = [Slot(seq=i) for i in range(slots)]
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._n_vocab = model.n_vocab()
        self._piece_buffer = ctypes.create_string_buffer(64)
        self._cond = threading.Condition()
        self._incoming: list[Request] = []
        self._waiting: list[Request] = []
        self._active: list[Request] = []
        self._closing = False
        self._prefix_sessions = 0
        self._thread = threading.Thread(target=self._loop, name="llama-scheduler", daemon=True)
        self._thread.start()

    # -- called from other threads -------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; its chunks arrive through request.emit."""
        with self._cond:
            self._incoming.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request at the next step; its slot keeps what was evaluated."""
        request.cancelled.set()
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Stop the scheduler thread and free the batch."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.lib.llama_batch_free(self._batch)

    # -- the scheduler thread ------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._active or self._closing):
                    self._cond.wait()
                if self._closing:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            try:
                self._schedule()
                if self._active:
                    self._step()
            except Exception as exc:  # keep serving; fail only what was in flight
                log.exception("llama scheduler step failed")
                for request in list(self._active):
                    self._finish(request, "error", error=exc)
                for slot in self.slots:
                    self._clear(slot)
        for request in [*self._active, *self._waiting, *self._incoming]:
            request.emit(RuntimeError("the model was unloaded"))

    def _schedule(self) -> None:
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            request.emit(Chunk(finish_reason="cancelled", prompt_tokens=len(request.prompt)))
        for request in [r for r in self._active if r.cancelled.is_set()]:
            self._finish(request, "cancelled")
        still_waiting: list[Request] = []
        for request in self._waiting:
            if request.session is None:
                request.session = self._prefix_session(request.prompt)
            slot = self._pick_slot(request)
            if slot is None:
                still_waiting.append(request)
            else:
                self._start(request, slot)
        self._waiting = still_waiting

    def _pick_slot(self, request: Request) -> Slot | None:
        idle = [s for s in self.slots if s.request is None]
        if request.session is not None:
            own = next((s for s in self.slots if s.session == request.session), None)
            if own is not None:
                return own if own.request is None else None
        if not idle:
            return None
        empty = [s for s in idle if not s.tokens and s.session is None]
        return empty[0] if empty else min(idle, key=lambda s: s.last_used)

    def _prefix_session(self, prompt: list[int]) -> str:
        """A name for the state of a request without a session: that of the idle state,
        resident or parked, sharing the longest prefix with its prompt, when that prefix
        is at least half of the state (a client resending a growing history); else new.

        Session-less clients (kernel2, the Bot API, stateless OpenAI requests) resend
        whole histories; this lets them skip what was already evaluated, like sessions.
        """
        candidates = [
            (s.session, s.tokens)
            for s in self.slots
            if s.request is None and s.session is not None and s.session.startswith(PREFIX_SESSION)
        ]
        candidates += list(self.store.tokens(PREFIX_SESSION))
        best, best_shared = None, 0
        for session, tokens in candidates:
            shared = common_prefix(tokens, prompt)
            if shared > best_shared and 2 * shared >= len(tokens):
                best, best_shared = session, shared
        if best is not None and best_shared >= MIN_PREFIX:
            return best
        self._prefix_sessions += 1
        return f"{PREFIX_SESSION}{self._prefix_sessions}"

    def _start(self, request: Request, slot: Slot) -> None:
        # Attention runs over every cell in use, other sequences' cells masked but still
        # visited: each idle 1,500-token session cost the others ~9% per token (flash
        # attention; ~60% without). Parking one in the store costs ~20 ms, once.
        for other in self.slots:
            if other is not slot and other.request is None and other.session is not None:
                self._evict(other)
        if slot.session != request.session:
            self._evict(slot)
            slot.session = request.session
            if request.session is not None and request.session in self.store:
                restored = self.store.take(request.session)
                if restored is not None:
                    self._restore(slot, *restored)
        reuse = common_prefix(slot.tokens, request.prompt)
        reuse = min(reuse, len(request.prompt) - 1)  # one token must be evaluated for logits
        self.lib.llama_memory_seq_rm(self._memory, slot.seq, reuse, -1)
        del slot.tokens[reuse:]
        request.pending = request.prompt[reuse:]
        request.reused = reuse
        request.slot = slot
        request.sampler = self._sampler(request.params)
        slot.request = request
        self.stats.prompt_tokens_reused += reuse
        self.stats.prompt_tokens_evaluated += len(request.pending)
        self.stats.generations += 1
        self._active.append(request)

    def _sampler(self, params: GenerationParams) -> Any:
        from llama_cpp import _internals

        defaults = self.sampling
        make_sampler: Any = _internals.LlamaSampler  # an untyped library class
        sampler = make_sampler()
        sampler.add_penalties(
            self._n_vocab,
            defaults.penalty_last_n,
            defaults.repeat_penalty,
            params.frequency_penalty or 0.0,
            params.presence_penalty or 0.0,
        )
        temperature = params.temperature if params.temperature is not None else defaults.temperature
        if temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(defaults.top_k)
            sampler.add_top_p(params.top_p if params.top_p is not None else defaults.top_p, 1)
            sampler.add_min_p(defaults.min_p, 1)
            sampler.add_temp(temperature)
            seed = params.seed if params.seed is not None else self.lib.LLAMA_DEFAULT_SEED
            sampler.add_dist(seed & 0xFFFFFFFF)
        return sampler

    def _evict(self, slot: Slot) -> None:
        """Save the slot's session state to the store (if it has one) and empty the slot."""
        if slot.session is not None and slot.tokens:
            size = self.lib.llama_state_seq_get_size(self.ctx.ctx, slot.seq)
            # Written in place and kept as is: each copy of tens of MB costs ~15 ms.
            data = bytearray(size)
            view = (ctypes.c_uint8 * size).from_buffer(data)
            written = self.lib.llama_state_seq_get_data(self.ctx.ctx, view, size, slot.seq)
            del view  # a bytearray cannot shrink while exported
            if written:
                del data[written:]
                self.store.put(slot.session, list(slot.tokens), data)
                self.stats.saved += 1
        self._clear(slot)

    def _clear(self, slot: Slot) -> None:
        self.lib.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        slot.tokens.clear()
        slot.session = None

    def _restore(self, slot: Slot, tokens: list[int], data: bytes | bytearray, where: str) -> None:
        # llama.cpp only reads it: point at the data instead of copying tens of MB.
        buffer: Any = (
            (ctypes.c_uint8 * len(data)).from_buffer(data)
            if isinstance(data, bytearray)
            else ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        )
        if self.lib.llama_state_seq_set_data(self.ctx.ctx, buffer, len(data), slot.seq):
            slot.tokens = tokens
            if where == "ram":
                self.stats.restored_from_ram += 1
            else:
                self.stats.restored_from_disk += 1
        else:  # the state did not fit: evaluate from scratch
            self.lib.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)

    def _cells_in_use(self) -> int:
        return sum(len(s.tokens) for s in self.slots)

    def _make_room(self, needed: int) -> None:
        """Save idle slots (least recently used first) until `needed` more cells fit."""
        for slot in sorted(self.slots, key=lambda s: s.last_used):
            if self._cells_in_use() + needed <= self.kv_cells:
                return
            if slot.request is None and slot.tokens:
                self._evict(slot)

    def _step(self) -> None:
        """Advance every active request: one token for each decoding stream, and the next
        prompt chunks (sharing the batch size) for those still reading their prompt."""
        decoding = [r for r in self._active if not r.pending and r.last_token is not None]
        prefilling = [r for r in self._active if r.pending]
        self._make_room(len(decoding) + sum(min(len(r.pending), self.n_batch) for r in prefilling))
        decode_items: list[Item] = []
        for request in decoding:
            assert request.last_token is not None
            decode_items.append((request, [request.last_token], True))
        prefill_items: list[Item] = []
        budget = self.n_batch - (len(decoding) if self.batch_streams else 0)
        for index, request in enumerate(prefilling):
            if budget <= 0:
                break
            share = max(1, budget // (len(prefilling) - index))
            take = min(len(request.pending), share)
            prefill_items.append((request, request.pending[:take], take == len(request.pending)))
            del request.pending[:take]
            budget -= take
        if self.batch_streams:
            groups = [decode_items + prefill_items]
        else:
            groups = [[item] for item in decode_items] + [prefill_items]
        streams = len(decode_items) if self.batch_streams else min(1, len(decode_items))
        self.stats.max_streams_in_batch = max(self.stats.max_streams_in_batch, streams)
        for group in groups:
            if group:
                self._run_batch(group)

    def _run_batch(self, items: list[Item]) -> None:
        """Decode one llama.cpp batch and sample the next token of each request that asked."""
        batch = self._batch
        batch.n_tokens = 0
        outputs: list[tuple[Request, int]] = []
        for request, tokens, wants_logits in items:
            slot = request.slot
            assert slot is not None
            for k, token in enumerate(tokens):
                i = batch.n_tokens
                batch.token[i] = token
                batch.pos[i] = len(slot.tokens)
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = slot.seq
                batch.logits[i] = wants_logits and k == len(tokens) - 1
                batch.n_tokens = i + 1
                slot.tokens.append(token)
            if wants_logits:
                outputs.append((request, batch.n_tokens - 1))
        code = self.lib.llama_decode(self.ctx.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        self.stats.batches += 1
        for request, index in outputs:
            token = request.sampler.sample(self.ctx, index)
            self._accept(request, token)

    def _accept(self, request: Request, token: int) -> None:
        slot = request.slot
        assert slot is not None
        if self.lib.llama_vocab_is_eog(self.model.vocab, token):
            self._finish(request, "stop")
            return
        request.produced += 1
        self.stats.completion_tokens += 1
        text = request.decoder.decode(self._piece(token))
        out, stopped = request.scanner.feed(text)
        if out:
            request.emit(Chunk(text=out))
        if stopped:
            self._finish(request, "stop", flush=False)
        elif request.produced >= request.limit or len(slot.tokens) + 1 >= self.n_ctx_seq:
            self._finish(request, "length")
        else:
            request.last_token = token

    def _piece(self, token: int) -> bytes:
        """The bytes a token stands for (no special-token text)."""
        size = self.lib.llama_token_to_piece(
            self.model.vocab, token, self._piece_buffer, len(self._piece_buffer), 0, False
        )
        if size < 0:  # longer than the buffer: retry with the size it asked for
            buffer = ctypes.create_string_buffer(-size)
            size = self.lib.llama_token_to_piece(self.model.vocab, token, buffer, -size, 0, False)
            return buffer.raw[:size]
        return self._piece_buffer.raw[:size]

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        *,
        flush: bool = True,
        error: BaseException | None = None,
    ) -> None:
        if request in self._active:
            self._active.remove(request)
        slot = request.slot
        if slot is not None:
            slot.request = None
            slot.last_used = time.monotonic()
            if slot.session is None and reason in ("error", "cancelled"):
                self._clear(slot)
        if request.sampler is not None:
            request.sampler.close()
            request.sampler = None
        if error is not None:
            request.emit(error)
            return
        if flush and reason != "cancelled":
            tail, stopped = request.scanner.feed(request.decoder.decode(b"", final=True))
            tail += "" if stopped else request.scanner.flush()
            if tail:
                request.emit(Chunk(text=tail))
        request.emit(
            Chunk(
                finish_reason=reason,
                prompt_tokens=len(request.prompt),
                completion_tokens=request.produced,
                cached_tokens=request.reused,
            )
        )
