"""Where the embedded model's time goes: llama_decode cost by batch shape and resident KV cells.

Loads the weights parlour loads (its converted copy of the embedded GGUF, made here with
parlour's converter in a temp directory; or --model as is) into llama.cpp contexts set up like
parlour's scheduler (unified KV cache, 8 sequences, 2 x n_ctx cells, parlour's threads and
flash-attention setting) and times `llama_decode` directly, alternating the variants within
each round so that load from other processes hits them alike:

1. decode steps of concurrent streams: 1, 2 and 4 streams in one batch (one token and one
   logits row each), and 4 streams as 4 separate one-token decodes;
2. a ~450-token prompt and one-token decodes in a context whose other sequences are empty,
   against one where 7 other sequences hold 1,000 cells each (idle sessions kept resident).

    python bench/probe_llama.py [--rounds 30] [--threads N] [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import _internals

from parlour.backends.convert import converted
from parlour.backends.registry import build_backend
from parlour.models import embedded_spec, spec_from_argument

Token = tuple[int, int, int, bool]  # sequence, position, token id, wants logits


class Context:
    """A llama.cpp context configured like parlour's scheduler, with a reusable batch."""

    def __init__(self, model: Any, backend: Any, threads: int) -> None:
        n_ctx = min(model.n_ctx_train(), 8192)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = 2 * n_ctx
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = 8
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if getattr(backend, "flash_attn", False)
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx: Any = _internals.LlamaContext(model=model, params=params, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(self, tokens: Sequence[Token]) -> float:
        """Seconds one llama_decode of these tokens takes."""
        batch = self.batch
        for i, (seq, pos, token, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.logits[i] = token, pos, logits
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(tokens)
        began = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - began

    def prompt(self, seq: int, tokens: Sequence[int], start: int = 0) -> float:
        """Evaluate a prompt into a sequence (logits for its last token only)."""
        last = len(tokens) - 1
        return self.decode([(seq, start + i, t, i == last) for i, t in enumerate(tokens)])

    def drop(self, seq: int, start: int = 0) -> None:
        """Forget a sequence's cells from `start` on."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, start, -1)

    def close(self) -> None:
        """Free the batch and the context."""
        llama_cpp.llama_batch_free(self.batch)
        self.ctx.close()


def measure(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, in alternating order; seconds per run."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(variants[name]())
    return times


def row(label: str, seconds: list[float], tokens: int, base: float | None) -> str:
    """A table row: median ms (range), tokens/s, relative to the first row."""
    median = statistics.median(seconds)
    relative = f"{median / base:.2f}x" if base else "1.00x"
    return (
        f"| {label} | {1000 * median:.2f} ({1000 * min(seconds):.2f}-{1000 * max(seconds):.2f})"
        f" | {tokens / median:.1f} | {relative} |"
    )


def main() -> None:
    """Load the weights, run both probes, print two tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", help="a .gguf loaded as is [parlour's embedded default]")
    args = parser.parse_args()
    spec = spec_from_argument(args.model) if args.model else embedded_spec()
    backend: Any = build_backend(spec, threads=args.threads)
    threads = int(backend.threads)
    with tempfile.TemporaryDirectory(prefix="probe-llama-") as temp:
        path = Path(backend.path)
        if backend.weights:
            path = converted(path, Path(temp), backend.weights)
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False  # as parlour loads it (AMX-safe)
        model: Any = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        print(
            f"weights {path.name}; threads {threads}; flash attention "
            f"{'on' if backend.flash_attn else 'off'}; {os.cpu_count()} CPUs; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        chat = "<|im_start|>user\nWrite a story about a bicycle.<|im_end|>\n<|im_start|>assistant\n"
        short = model.tokenize(chat.encode(), False, True)
        policy = " ".join(["Bikes can be returned within 14 days if ridden less than 50 km."] * 30)
        long = model.tokenize(f"<|im_start|>system\n{policy}".encode(), False, True)[:450]

        # 1. Concurrent streams: one batch, or one decode per stream.
        ctx = Context(model, backend, threads)
        for seq in range(4):
            ctx.prompt(seq, short)
        positions = [len(short)] * 4

        def streams(count: int, together: bool) -> Callable[[], float]:
            def run() -> float:
                tokens = [(s, positions[s], 100, True) for s in range(count)]
                if together:
                    spent = ctx.decode(tokens)
                else:
                    spent = sum(ctx.decode([token]) for token in tokens)
                for s in range(count):
                    positions[s] += 1
                    if positions[s] > len(short) + 200:  # keep the sequences short
                        ctx.drop(s, len(short))
                        positions[s] = len(short)
                return spent

            return run

        times = measure(
            {
                "1 stream": streams(1, True),
                "2 streams, one batch": streams(2, True),
                "4 streams, one batch": streams(4, True),
                "4 streams, 4 one-token decodes": streams(4, False),
            },
            args.rounds,
        )
        ctx.close()
        base = statistics.median(times["1 stream"])
        print(f"\nOne decode step of concurrent streams, median (min-max) of {args.rounds}\n")
        print("| streams | ms per step | tokens/s | vs 1 stream |")
        print("|---|---|---|---|")
        for label, seconds in times.items():
            count = 1 if label == "1 stream" else int(label.split()[0])
            print(row(label, seconds, count, None if label == "1 stream" else base))

        # 2. Other sessions' cells resident in the shared cache.
        empty, crowded = Context(model, backend, threads), Context(model, backend, threads)
        filler = (long * 3)[:500]
        for seq in range(1, 8):
            crowded.prompt(seq, filler)
            crowded.prompt(seq, filler, 500)
        prompt_times: dict[str, list[float]] = {"empty": [], "crowded": []}
        decode_times: dict[str, list[float]] = {"empty": [], "crowded": []}

        def turn(name: str, context: Context) -> Callable[[], float]:
            def run() -> float:
                context.drop(0)
                spent = context.prompt(0, long)
                prompt_times[name].append(spent)
                for k in range(8):
                    decode_times[name].append(context.decode([(0, len(long) + k, 100, True)]))
                return spent

            return run

        measure({"empty": turn("empty", empty), "crowded": turn("crowded", crowded)}, 6)
        empty.close()
        crowded.close()
        print(
            f"\nA {len(long)}-token prompt and one-token decodes while other sequences of the "
            "same context are empty or hold 7 x 1,000 cells (median (min-max))\n"
        )
        print("| other sequences | prompt ms | prompt tokens/s | vs empty |")
        print("|---|---|---|---|")
        print(row("empty", prompt_times["empty"], len(long), None))
        print(
            row(
                "7 x 1,000 cells",
                prompt_times["crowded"],
                len(long),
                statistics.median(prompt_times["empty"]),
            )
        )
        print("\n| other sequences | decode ms per token | tokens/s | vs empty |")
        print("|---|---|---|---|")
        print(row("empty", decode_times["empty"], 1, None))
        print(
            row(
                "7 x 1,000 cells",
                decode_times["crowded"],
                1,
                statistics.median(decode_times["empty"]),
            )
        )
        model.close()


if __name__ == "__main__":
    main()
