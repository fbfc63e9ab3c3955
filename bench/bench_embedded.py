"""Embedded model speed: raw llama-cpp-python against parlour's streamed /v1/chat/completions.

Loads the GGUF file a fresh `parlour serve` (own port, own temporary data directory)
loaded, with the same threads, batch size and flash-attention setting, in this process
through llama-cpp-python's `Llama`, and measures in the same run, alternating which goes
first each round:

- decode tokens/s and time to first token for a short prompt;
- prefill tokens/s for a ~1,500-token history (one long first message of a new session:
  prompt tokens / time to first token), and the follow-up turn that reuses the evaluated
  prefix (KV cache).

Parlour is driven over HTTP with streaming and `stream_options.include_usage`, so its
numbers include the request path, the database writes of a turn, and SSE encoding.

    python bench/bench_embedded.py [--rounds 3] [--tokens 128] [--history 1500]
                                   [--weights q8_0|bf16|f16|none] [--threads N]
                                   [--batch-threads N] [--no-flash-attn]
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from parlour.backends.convert import converted
from parlour.backends.llama import _without_extra_buffer_types, default_threads
from parlour.models import EMBEDDED_NAME, embedded_gguf

STORY = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
FOLLOW_UP = "Summarise that in one sentence."
FILLER = (
    "the harbour town woke slowly under a grey sky while fishing boats rocked against "
    "the pier and Maria checked the ledger twice before handing the keys to the new "
    "tenant; in 1887 the railway finally reached the valley bringing letters newspapers "
    "and strangers; photosynthesis converts light energy into chemical energy stored in "
    "glucose; he asked whether the meeting could move to Thursday afternoon; a good "
    "sourdough starter needs flour water patience and a warm kitchen; the committee "
    "agreed to publish the results once the audit was complete; rain drummed on the tin "
    "roof while the children played cards by candlelight"
)


@dataclass
class Sample:
    """One streamed reply: when its first text came and how fast the rest followed."""

    ttft: float
    prompt_tokens: int
    completion_tokens: int
    decode_seconds: float

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one."""
        if self.completion_tokens < 2 or self.decode_seconds <= 0:
            return float("nan")
        return (self.completion_tokens - 1) / self.decode_seconds

    @property
    def prefill_rate(self) -> float:
        """Prompt tokens per second of time to first token."""
        return self.prompt_tokens / self.ttft


@dataclass
class Series:
    """The samples of one measurement, for raw and for parlour."""

    raw: list[float] = field(default_factory=list)
    parlour: list[float] = field(default_factory=list)


@dataclass
class Results:
    """Every measurement's series and the token counts they ran with."""

    series: dict[str, Series] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)

    def add(self, key: str, side: str, value: float) -> None:
        """Record one sample for `raw` or `parlour`."""
        getattr(self.series.setdefault(key, Series()), side).append(value)

    def count(self, key: str, value: int) -> None:
        """Record a token count."""
        self.counts.setdefault(key, []).append(value)

    def median_count(self, key: str) -> int:
        """The median of a token count."""
        return int(statistics.median(self.counts[key]))


@dataclass(frozen=True)
class Server:
    """A running `parlour serve`."""

    url: str
    ready_seconds: float
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time its threads have used (Linux; NaN elsewhere)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Config:
    """The settings both sides run with."""

    weights: str | None
    threads: int
    batch_threads: int
    flash_attn: bool
    n_batch: int = 512


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def history_text(rng: random.Random, count: Callable[[str], int], tokens: int) -> str:
    """Prose-like filler of about `tokens` tokens, different for each seed."""
    vocabulary = FILLER.split()
    words: list[str] = []
    while count(" ".join(words)) < tokens:
        words.extend(rng.choice(vocabulary) for _ in range(50))
    while len(words) > 1 and count(" ".join(words)) > tokens:
        words.pop()
    return "Here are my notes so far: " + " ".join(words)


@contextmanager
def parlour_server(config: Config, data_dir: Path, custom: bool) -> Iterator[Server]:
    """A `parlour serve` subprocess on a free port, stopped on exit."""
    port = free_port()
    args = [sys.executable, "-m", "parlour", "serve", "--port", str(port)]
    args += ["--data-dir", str(data_dir), "--log-level", "warning"]
    if custom:
        weights = config.weights or "none"
        toml = (
            f'[[models]]\nname = "{EMBEDDED_NAME}"\nbackend = "llama"\nweights = "{weights}"\n'
            f"threads = {config.threads}\nbatch_threads = {config.batch_threads}\n"
            f"flash_attn = {str(config.flash_attn).lower()}\n"
        )
        (data_dir / "models.toml").write_text(toml)
        args += ["--config", str(data_dir / "models.toml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
    log = (data_dir / "server.log").open("wb")
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError((data_dir / "server.log").read_text())
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 180:
                raise RuntimeError("parlour did not become ready in 180 s")
            time.sleep(0.05)
        yield Server(url, time.perf_counter() - started, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


class Raw:
    """llama-cpp-python's `Llama` on the same file with the same settings."""

    def __init__(self, path: Path, config: Config) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        with _without_extra_buffer_types():
            self.llm: Any = Llama(
                model_path=str(path),
                n_ctx=0,
                n_batch=config.n_batch,
                n_ubatch=config.n_batch,
                n_threads=config.threads,
                n_threads_batch=config.batch_threads,
                flash_attn=config.flash_attn,
                verbose=False,
            )
        model = self.llm._model
        self.reply = ""
        self.formatter: Any = Jinja2ChatFormatter(
            template=self.llm.metadata["tokenizer.chat_template"],
            bos_token=model.token_get_text(model.token_bos()),
            eos_token=model.token_get_text(model.token_eos()),
        )

    def count(self, text: str) -> int:
        """Tokens in plain text."""
        return len(self.llm.tokenize(text.encode(), False, False))

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt tokens for chat messages, rendered with the model's template."""
        text = self.formatter(messages=messages).prompt
        tokens: list[int] = self.llm.tokenize(text.encode(), False, True)
        return tokens

    def stream(self, tokens: list[int], max_tokens: int, seed: int, fresh: bool) -> Sample:
        """Generate like parlour's defaults do; the KV prefix is kept unless `fresh`."""
        import llama_cpp

        llm = self.llm
        if fresh:
            llm.reset()
        llm.set_seed(seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        started = time.perf_counter()
        times: list[float] = []
        produced = 0
        pieces: list[str] = []
        for token in llm.generate(
            tokens, temp=0.2, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            produced += 1
            piece = decoder.decode(llm.detokenize([token]))
            if piece:
                times.append(time.perf_counter())
                pieces.append(piece)
            if produced >= max_tokens:
                break
        first = times[0] if times else time.perf_counter()
        self.reply = "".join(pieces)
        return Sample(first - started, len(tokens), produced, times[-1] - first if times else 0)


def parlour_stream(
    client: httpx.Client, session: str, content: str, max_tokens: int, seed: int
) -> Sample:
    """One streamed turn; text timings from the SSE events, token counts from the usage."""
    body = {
        "model": EMBEDDED_NAME,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0.2,
        "seed": seed,
    }
    started = time.perf_counter()
    times: list[float] = []
    usage: dict[str, int] = {}
    headers = {"x-session-key": session}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if any(c["delta"].get("content") for c in event.get("choices", [])):
                times.append(time.perf_counter())
            usage = event.get("usage") or usage
    first = times[0] if times else time.perf_counter()
    return Sample(
        first - started,
        usage["prompt_tokens"],
        usage["completion_tokens"],
        times[-1] - first if times else 0,
    )


def cpu_name() -> str:
    """The CPU model as lscpu reports it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def summary(values: list[float], digits: int = 0) -> str:
    """Median with the range, e.g. `141 (138-145)`."""
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def main() -> None:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="reply tokens for decode")
    parser.add_argument("--history", type=int, default=1500, help="history tokens for prefill")
    parser.add_argument("--weights", choices=["q8_0", "bf16", "f16", "none"], default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-threads", type=int, default=None)
    parser.add_argument("--no-flash-attn", action="store_true")
    options = parser.parse_args()
    custom = any(
        v is not None for v in (options.weights, options.threads, options.batch_threads)
    ) or bool(options.no_flash_attn)
    threads = options.threads or default_threads()
    config = Config(
        weights=(options.weights or "q8_0") if options.weights != "none" else None,
        threads=threads,
        batch_threads=options.batch_threads or threads,
        flash_attn=not options.no_flash_attn,
    )
    source = embedded_gguf()
    with tempfile.TemporaryDirectory(prefix="parlour-bench-") as scratch:
        convert_seconds = float("nan")
        if config.weights is not None:
            started = time.perf_counter()
            converted(source, Path(scratch) / "convert", config.weights, threads=threads)
            convert_seconds = time.perf_counter() - started
        data_dir = Path(scratch) / "data"
        data_dir.mkdir()
        with parlour_server(config, data_dir, custom) as server:
            cached = sorted((data_dir / "cache").glob("*.gguf"))
            path = cached[0] if cached else source
            raw = Raw(path, config)
            client = httpx.Client(base_url=server.url, timeout=600)
            results = run_rounds(raw, client, server, options)
            client.close()
        print_report(config, path, convert_seconds, server.ready_seconds, options, results)


def raw_round(raw: Raw, results: Results, r: int, text: str, tokens: int) -> None:
    """One round's measurements with llama-cpp-python."""
    short = raw.prompt([{"role": "user", "content": STORY}])
    cpu = time.process_time()
    sample = raw.stream(short, tokens, seed=r, fresh=True)
    results.add("cpu", "raw", (time.process_time() - cpu) * 1000 / sample.completion_tokens)
    results.add("decode", "raw", sample.decode_rate)
    results.add("ttft", "raw", sample.ttft * 1000)
    long = raw.prompt([{"role": "user", "content": text}])
    sample = raw.stream(long, 1, seed=r, fresh=True)
    results.add("prefill", "raw", sample.prefill_rate)
    results.add("history_ttft", "raw", sample.ttft * 1000)
    follow = raw.prompt(
        [
            {"role": "user", "content": text},
            {"role": "assistant", "content": raw.reply},
            {"role": "user", "content": FOLLOW_UP},
        ]
    )
    sample = raw.stream(follow, 1, seed=r, fresh=False)
    results.add("follow_up", "raw", sample.ttft * 1000)


def parlour_round(
    client: httpx.Client, server: Server, results: Results, r: int, text: str, tokens: int
) -> None:
    """One round's measurements through parlour, each reply in a new session."""
    cpu = server.cpu_seconds()
    sample = parlour_stream(client, f"bench-{uuid.uuid4().hex}", STORY, tokens, r)
    used = server.cpu_seconds() - cpu
    results.add("cpu", "parlour", used * 1000 / sample.completion_tokens)
    results.add("decode", "parlour", sample.decode_rate)
    results.add("ttft", "parlour", sample.ttft * 1000)
    results.count("reply", sample.completion_tokens)
    session = f"bench-{uuid.uuid4().hex}"
    sample = parlour_stream(client, session, text, 1, r)
    results.add("prefill", "parlour", sample.prefill_rate)
    results.add("history_ttft", "parlour", sample.ttft * 1000)
    results.count("history", sample.prompt_tokens)
    sample = parlour_stream(client, session, FOLLOW_UP, 1, r)
    results.add("follow_up", "parlour", sample.ttft * 1000)
    results.count("follow", sample.prompt_tokens)


def run_rounds(
    raw: Raw, client: httpx.Client, server: Server, options: argparse.Namespace
) -> Results:
    """Alternate raw and parlour for each measurement; every round uses new text."""
    results = Results()
    rounds, tokens, history = options.rounds, options.tokens, options.history
    for r in range(rounds):
        text = history_text(random.Random(r), raw.count, history)
        if r % 2 == 0:
            raw_round(raw, results, r, text, tokens)
            parlour_round(client, server, results, r, text, tokens)
        else:
            parlour_round(client, server, results, r, text, tokens)
            raw_round(raw, results, r, text, tokens)
        decode, prefill = results.series["decode"], results.series["prefill"]
        print(
            f"round {r + 1}/{rounds}: decode raw {decode.raw[-1]:.0f} / parlour "
            f"{decode.parlour[-1]:.0f} tok/s; prefill raw {prefill.raw[-1]:.0f} / parlour "
            f"{prefill.parlour[-1]:.0f} tok/s",
            file=sys.stderr,
            flush=True,
        )
    return results


def print_report(
    config: Config,
    path: Path,
    convert_seconds: float,
    ready_seconds: float,
    options: argparse.Namespace,
    results: Results,
) -> None:
    """The setup and one Markdown table: median (min-max) over the rounds."""
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    print(f"GGUF: {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(
        f"settings: threads {config.threads}, batch threads {config.batch_threads}, "
        f"n_batch = n_ubatch = {config.n_batch}, flash attention "
        f"{'on' if config.flash_attn else 'off'}, use_extra_bufts off"
    )
    conversion = (
        f"conversion to {config.weights}: {convert_seconds:.2f} s"
        if config.weights
        else "no conversion"
    )
    print(f"{conversion}; parlour start to ready (fresh data dir): {ready_seconds:.2f} s")
    print(
        f"{options.rounds} rounds, alternating; replies of up to {options.tokens} tokens "
        f"(parlour's median {results.median_count('reply')}); history prompt "
        f"{results.median_count('history')} tokens, follow-up prompt "
        f"{results.median_count('follow')} tokens\n"
    )
    rows = [
        ("decode tokens/s", "decode", 0),
        ("time to first token, short prompt (ms)", "ttft", 0),
        ("CPU time per reply token, all threads (ms)", "cpu", 2),
        (f"prefill tokens/s, {options.history}-token history, fresh", "prefill", 0),
        (f"time to first token, {options.history}-token history (ms)", "history_ttft", 0),
        ("time to first token, follow-up turn, prefix reused (ms)", "follow_up", 0),
    ]
    print("| measurement | raw llama-cpp-python | parlour (streamed HTTP) | parlour/raw |")
    print("|---|---|---|---|")
    for label, key, digits in rows:
        series = results.series[key]
        ratio = statistics.median(series.parlour) / statistics.median(series.raw)
        print(
            f"| {label} | {summary(series.raw, digits)} | {summary(series.parlour, digits)} "
            f"| {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
