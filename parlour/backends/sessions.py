"""Per-session prompt state for the embedded model, and fair scheduling of concurrent streams.

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
import hashlib
import logging
import os
import shutil
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Chunk, FinishReason, GenerationParams

log = logging.getLogger(__name__)

Emit = Callable[[Chunk | BaseException], None]
#: A request, the tokens it adds to a batch, and whether it wants logits for the last one.
Item = tuple["Request", list[int], bool]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StopScanner:
    """Finds stop strings across chunk boundaries, holding back text that may start one."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StateStore:
    """Saved sequence states of idle sessions: newest in RAM, older on disk, both bounded."""

    def __init__(self, *, ram_bytes: int, disk_bytes: int, directory: Path | None) -> None:
        self.ram_bytes = ram_bytes
        self.disk_bytes = disk_bytes if directory is not None else 0
        self.directory = directory
        self._ram: OrderedDict[str, tuple[list[int], bytes | bytearray]] = OrderedDict()
        self._disk: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self.ram_used = 0
        self.disk_used = 0
        self.dropped = 0
        if directory is not None:
            # Saved states belong to this process's context: each process keeps its own
            # folder, and folders of processes that are gone are removed.
            for other in directory.glob("*") if directory.is_dir() else []:
                if other.name.isdigit() and not _alive(int(other.name)):
                    shutil.rmtree(other, ignore_errors=True)
            self.directory = directory / str(os.getpid())
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)

    def __contains__(self, session: str) -> bool:
        return session in self._ram or session in self._disk

    def put(self, session: str, tokens: list[int], data: bytes | bytearray) -> None:
        """Keep a session's state, pushing the oldest ones to disk and then out."""
        self.discard(session)
        self._ram[session] = (tokens, data)
        self.ram_used += len(data)
        while self.ram_used > self.ram_bytes and self._ram:
            old, (old_tokens, old_data) = self._ram.popitem(last=False)
            self.ram_used -= len(old_data)
            self._to_disk(old, old_tokens, old_data)

    def take(self, session: str) -> tuple[list[int], bytes | bytearray, str] | None:
        """Remove and return a session's state with where it was ("ram" or "disk")."""
        if session in self._ram:
            tokens, data = self._ram.pop(session)
            self.ram_used -= len(data)
            return tokens, data, "ram"
        if session in self._disk:
            path, size = self._disk.pop(session)
            self.disk_used -= size
            try:
                raw = path.read_bytes()
            except OSError:
                return None
            finally:
                path.unlink(missing_ok=True)
            (count,) = struct.unpack_from("<Q", raw)
            tokens = list(struct.unpack_from(f"<{count}i", raw, 8))
            return tokens, raw[8 + 4 * count :], "disk"
        return None

    def discard(self, session: str) -> None:
        """Forget a session's saved state, wherever it is."""
        if session in self._ram:
            self.ram_used -= len(self._ram.pop(session)[1])
        if session in self._disk:
            path, size = self._disk.pop(session)
            self.disk_used -= size
            path.unlink(missing_ok=True)

    def _to_disk(self, session: str, tokens: list[int], data: bytes | bytearray) -> None:
        size = 8 + 4 * len(tokens) + len(data)
        if self.directory is None or size > self.disk_bytes:
            self.dropped += 1
            return
        while self.disk_used + size > self.disk_bytes and self._disk:
            _, (path, old_size) = self._disk.popitem(last=False)
            self.disk_used -= old_size
            path.unlink(missing_ok=True)
            self.dropped += 1
        name = hashlib.sha256(session.encode()).hexdigest()[:40]
        path = self.directory / f"{name}.state"
        temp = path.with_suffix(".state.tmp")
        with temp.open("wb") as out:
            out.write(struct.pack("<Q", len(tokens)))
            out.write(struct.pack(f"<{len(tokens)}i", *tokens))
            out.write(data)
        os.replace(temp, path)
        self._disk[session] = (path, size)
        self.disk_used += size


@dataclass
class Slot:
    """One sequence of the shared context and whose tokens it holds."""

    seq: int
    session: str | None = None
    tokens: list[int] = field(default_factory=list)
    request: Request | None = None
    last_used: float = 0.0


class Request:
    """One generation as the scheduler tracks it."""

    def __init__(
        self,
        *,
        prompt: list[int],
        params: GenerationParams,
        session: str | None,
        emit: Emit,
        limit: int,
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.session = session
        self.emit = emit
        self.limit = limit
        self.cancelled = threading.Event()
        self.pending: list[int] = []
        self.last_token: int | None = None
        self.produced = 0
        self.reused = 0
        self.sampler: Any = None
        self.slot: Slot | None = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.scanner = StopScanner(params.stop)


@dataclass(frozen=True)
class Sampling:
    """Defaults for parameters a request leaves open."""

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
        sampling: Sampling,
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
        anonymous = [s for s in idle if s.session is None and s.tokens]
        if request.session is None and anonymous:
            # Stateless clients resend whole histories: reuse the idle slot (of no
            # session) sharing the longest prefix with this prompt, if any share much.
            best = max(anonymous, key=lambda s: common_prefix(s.tokens, request.prompt))
            if common_prefix(best.tokens, request.prompt) >= 16:
                return best
        empty = [s for s in idle if not s.tokens and s.session is None]
        return empty[0] if empty else min(idle, key=lambda s: s.last_used)

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
