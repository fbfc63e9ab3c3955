"""Weight types and llama.cpp settings for the embedded model, compared in one process.

Converts the embedded SmolLM2 Q4_1 GGUF with parlour's own converter (plus F32 as the
quality reference), loads every configuration at once with llama-cpp-python
(`use_extra_bufts` off, as parlour loads it), and alternates between them each round:
prefill of a 1,500-token prompt and decode of 128 tokens, as wall-clock tokens/s and
as tokens per CPU-second of this process (steadier when other processes share the
CPU; not comparable across thread counts, since waiting threads spin). Then the
next-token distributions over a fixed text against F32 (the exact Q4_1 values):
KL divergence, top-1 agreement, perplexity.

    python bench/bench_weights.py [--rounds 6] [--configs q4_1:1:1:0 q8_0:1:1:1 ...]

A config is `weights:threads:batch_threads:flash_attn`; weights is q4_1 (the file as
shipped), q8_0, bf16, f16, q4_0 or f32.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parlour.backends.convert import converted
from parlour.backends.llama import _without_extra_buffer_types
from parlour.models import embedded_gguf

DEFAULT_CONFIGS = [
    "q4_1:1:1:0",
    "q4_1:1:1:1",
    "q8_0:1:1:0",
    "q8_0:1:1:1",
    "bf16:1:1:1",
    "f16:1:1:1",
]
STORY = b"<|im_start|>user\nTell me a story about a lighthouse keeper.<|im_end|>\n"
STORY += b"<|im_start|>assistant\n"
QUALITY_TEXT = Path(__file__).resolve().parent.parent / "README.md"


@dataclass(frozen=True)
class Config:
    """One way to run the model."""

    weights: str
    threads: int
    batch_threads: int
    flash_attn: bool

    @classmethod
    def parse(cls, text: str) -> Config:
        """`q8_0:1:1:1` -> Config."""
        weights, threads, batch, flash = text.split(":")
        return cls(weights, int(threads), int(batch), flash == "1")

    def __str__(self) -> str:
        flash = "on" if self.flash_attn else "off"
        return f"{self.weights}, threads {self.threads}/{self.batch_threads}, flash attn {flash}"


@dataclass
class Rates:
    """Samples of one configuration."""

    prefill_wall: list[float] = field(default_factory=list)
    prefill_cpu: list[float] = field(default_factory=list)
    decode_wall: list[float] = field(default_factory=list)
    decode_cpu: list[float] = field(default_factory=list)


def weights_file(weights: str, folder: Path) -> Path:
    """The GGUF for a weight type: the shipped file, parlour's conversion, or F32/Q4_0."""
    import llama_cpp

    source = embedded_gguf()
    if weights == "q4_1":
        return source
    if weights in ("f32", "q4_0"):
        target = folder / f"{weights}.gguf"
        if not target.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = 0 if weights == "f32" else 2  # LLAMA_FTYPE_ALL_F32 / MOSTLY_Q4_0
            params.allow_requantize = True
            code = llama_cpp.llama_model_quantize(
                str(source).encode(), str(target).encode(), ctypes.byref(params)
            )
            if code != 0:
                raise RuntimeError(f"converting to {weights} failed ({code})")
        return target
    return converted(source, folder, weights)


def load(path: Path, config: Config, *, logits_all: bool = False) -> Any:
    """A llama-cpp-python `Llama` loaded the way parlour loads models."""
    from llama_cpp import Llama

    with _without_extra_buffer_types():
        return Llama(
            model_path=str(path),
            n_ctx=2048,
            n_batch=512,
            n_ubatch=512,
            n_threads=config.threads,
            n_threads_batch=config.batch_threads,
            flash_attn=config.flash_attn,
            logits_all=logits_all,
            verbose=False,
        )


def prompt(llm: Any, tokens: int) -> list[int]:
    """`tokens` tokens of varied prose."""
    words = QUALITY_TEXT.read_text(encoding="utf-8").split()
    text = " ".join(words * (1 + 4 * tokens // max(1, len(words))))
    ids: list[int] = llm.tokenize(text.encode(), True, False)[:tokens]
    return ids


def measure(llm: Any, long: list[int], short: list[int], decode: int, rates: Rates) -> None:
    """One prefill of `long` and one decode of `decode` tokens after `short`."""
    llm.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    llm.eval(long)
    rates.prefill_wall.append(len(long) / (time.perf_counter() - wall))
    rates.prefill_cpu.append(len(long) / (time.process_time() - cpu))
    llm.reset()
    stream = llm.generate(short, temp=0.2, top_p=0.9, top_k=40, repeat_penalty=1.1)
    for produced, _token in enumerate(stream):
        if produced == 0:  # the clock starts at the first token: prompt work excluded
            wall, cpu = time.perf_counter(), time.process_time()
        if produced == decode:
            break
    rates.decode_wall.append(decode / (time.perf_counter() - wall))
    rates.decode_cpu.append(decode / (time.process_time() - cpu))


def log_softmax(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Row-wise log-softmax."""
    shifted = x - x.max(axis=-1, keepdims=True)
    result: np.ndarray[Any, Any] = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def next_token_logprobs(path: Path, tokens: int) -> tuple[np.ndarray[Any, Any], list[int]]:
    """Log-probabilities of every next token over the quality text."""
    llm = load(path, Config("", 1, 2, True), logits_all=True)
    ids = prompt(llm, tokens)
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return log_softmax(scores), ids


def quality(weights: list[str], folder: Path, tokens: int) -> None:
    """KL divergence to F32, top-1 agreement and perplexity for each weight type."""
    reference, ids = next_token_logprobs(weights_file("f32", folder), tokens)
    targets = np.array(ids[1:])
    print(f"\nNext-token quality over {tokens} tokens of README.md, against F32:\n")
    print("| weights | KL to F32 | top-1 agreement | perplexity | file MiB |")
    print("|---|---|---|---|---|")
    for name in ["f32", *weights]:
        path = weights_file(name, folder)
        logprobs = reference if name == "f32" else next_token_logprobs(path, tokens)[0]
        kl = float((np.exp(reference) * (reference - logprobs)).sum(axis=-1).mean())
        top1 = float((reference.argmax(-1) == logprobs.argmax(-1)).mean())
        nll = float(-logprobs[np.arange(len(targets)), targets].mean())
        size = path.stat().st_size / 2**20
        print(f"| {name} | {kl:.5f} | {top1:.1%} | {np.exp(nll):.2f} | {size:.0f} |")


def median_best(values: list[float]) -> str:
    """`median (best)`."""
    return f"{statistics.median(values):.0f} ({max(values):.0f})"


def main() -> None:
    """Measure every configuration, alternating, then compare quality."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=1500, help="prefill tokens")
    parser.add_argument("--decode", type=int, default=128, help="decode tokens")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--no-quality", action="store_true")
    options = parser.parse_args()
    configs = [Config.parse(c) for c in options.configs]
    import llama_cpp  # noqa: F401  (loaded before anything is timed)

    with tempfile.TemporaryDirectory(prefix="parlour-weights-") as scratch:
        folder = Path(scratch)
        convert = {"q4_1": "-"}  # the file as shipped
        for weights in dict.fromkeys(c.weights for c in configs):
            if weights not in convert:
                started = time.perf_counter()
                weights_file(weights, folder)
                convert[weights] = f"{time.perf_counter() - started:.2f}"
        models: dict[Config, Any] = {}
        load_seconds: dict[Config, float] = {}
        for config in configs:
            started = time.perf_counter()
            models[config] = load(weights_file(config.weights, folder), config)
            load_seconds[config] = time.perf_counter() - started
        first = next(iter(models.values()))
        long = prompt(first, options.prompt)
        short: list[int] = first.tokenize(STORY, False, True)
        rates = {config: Rates() for config in configs}
        for r in range(options.rounds):
            for config in configs if r % 2 == 0 else configs[::-1]:
                measure(models[config], long, short, options.decode, rates[config])
            print(f"round {r + 1}/{options.rounds} done", flush=True)
        for llm in models.values():
            llm.close()
        print(
            f"\n{options.rounds} rounds, alternating; prefill {len(long)} tokens, decode "
            f"{options.decode} tokens; tokens/s as median (best)\n"
        )
        print(
            "| config | convert s | load s | prefill tok/s | prefill tok/CPU-s "
            "| decode tok/s | decode tok/CPU-s |"
        )
        print("|---|---|---|---|---|---|---|")
        for config in configs:
            rate = rates[config]
            print(
                f"| {config} | {convert[config.weights]} "
                f"| {load_seconds[config]:.2f} | {median_best(rate.prefill_wall)} "
                f"| {median_best(rate.prefill_cpu)} | {median_best(rate.decode_wall)} "
                f"| {median_best(rate.decode_cpu)} |"
            )
        if not options.no_quality:
            quality(list(dict.fromkeys(c.weights for c in configs)), folder, 768)


if __name__ == "__main__":
    main()
