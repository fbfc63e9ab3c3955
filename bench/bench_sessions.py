"""Embedded model: per-session prompt state and concurrent streams, against llama_cpp.server.

Starts a real `parlour serve` (embedded SmolLM2, temp data directory) and llama-cpp-python's own
OpenAI-compatible server (`python -m llama_cpp.server`, launched through
tests/support/llama_server.py for the AMX-safe load setting) and measures both in the same run,
alternating which goes first:

- single stream: time to first token and decode tokens/s, with raw llama-cpp-python decode
  (`Llama.generate` in this process) as the ceiling;
- N simultaneous streams: how many completed with a full reply, aggregate tokens/s;
- N conversations interleaved round-robin for T turns: time to first token per turn.

All three load the same weights file (the one parlour loads: by default its converted copy of
the embedded GGUF; with --model, that file as is) with parlour's threads and flash-attention
setting. parlour gets only each turn's new message with `x-session-key`; "parlour stateless"
(the same server, PARLOUR_SESSIONLESS=stateless) and llama_cpp.server get the whole history
every turn without a session, as a stateless server needs. Both stream, at temperature 0 with
the same repeat penalty (parlour's default, 1.1). The peer runs from a bench-only virtualenv
under bench/.peers/ made from pip's cached llama-cpp-python wheel (never built from source);
without that wheel it falls back to the project's own environment and says so.

    python bench/bench_sessions.py [--repeats 3] [--single-repeats 7] [--threads 1]
        [--model PATH.gguf] [--parts single streams interleaved] [--peer-env auto|main]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / ".peers"
PEER_VENV = PEERS / "llama-server"
CONTEXT = 8192
REPEAT_PENALTY = 1.1  # parlour's default; sent to the peer so both sample the same way

Message = dict[str, str]

POLICY = """\
You are the customer assistant of Harbor Cycles, a bicycle shop with two stores (Harbour Street \
and Mill Lane) and an online shop. Answer in a friendly, plain style, in at most three short \
paragraphs, and never invent prices, stock levels or delivery dates you were not given.

What the shop sells: city and commuter bikes, road bikes, gravel bikes, children's bikes, \
electric bikes from two brands (Voltaro and Kestrel), helmets, locks, lights, panniers, child \
seats, clothing and spare parts. Bikes can be reserved online and collected in a store the \
next working day.

Service: a basic service costs 45, a full service 95, both include a safety check. Electric \
bikes need a battery and motor check once a year, done in the Mill Lane store only. Repairs \
are booked online or by phone; walk-in repairs are taken when a mechanic is free. Puncture \
repairs are done while the customer waits.

Returns and warranty: unused items can be returned within 30 days with the receipt. Bikes can \
be returned within 14 days if ridden less than 50 km. Frames carry a 5-year warranty, \
components 2 years, electric motors and batteries 2 years or 500 charge cycles. Damage from \
crashes is not covered.

Financing: purchases above 300 can be paid in 6 or 12 monthly instalments without interest, \
subject to approval. Cycle-to-work vouchers are accepted.

Opening hours: Monday to Friday 9:00 to 18:00, Saturday 9:00 to 17:00, closed on Sundays and \
public holidays. The phone line opens at 8:30.

If a question is about something the shop does not do, say so and suggest where the customer \
might look instead. If the customer is unhappy, apologise once, then offer a concrete next \
step: a call back from the store manager, a repair booking, or a return."""

CUSTOMERS = [
    "Ana Ruiz, a commuter who rides 10 km each way",
    "Tom Becker, a parent of two young children",
    "Priya Nair, a student on a tight budget",
    "Jonas Weber, a retired teacher who tours on weekends",
]

TURNS = [
    [
        "Hi, I need a bike for my 10 km commute. What would you suggest?",
        "Would an electric bike be worth it instead?",
        "How often should I get it serviced?",
        "Can I pay in instalments?",
        "What if it turns out not to fit me?",
        "Great, when are you open on Saturday?",
    ],
    [
        "Hello, my daughter is six. What bike sizes do you have for her?",
        "Do you sell helmets for children too?",
        "Can I fit a child seat on my own city bike?",
        "Is the child seat covered by warranty?",
        "Could I reserve one online and collect it tomorrow?",
        "Thanks. Which store is closer to the station?",
    ],
    [
        "Hey, what is the cheapest way to keep an old bike running?",
        "I got a flat tyre, can you fix it today?",
        "How much is a basic service?",
        "Do you take cycle-to-work vouchers?",
        "Can I return a lock I never used?",
        "Cool, are you open on Sunday?",
    ],
    [
        "Good morning. I want to start touring with panniers. Where do I begin?",
        "Which of your bikes is best for long gravel roads?",
        "My old frame cracked after a fall, is that covered?",
        "What does a full service include?",
        "Do you check electric bike batteries as well?",
        "Thank you. Can I book a repair by phone?",
    ],
]

SINGLE_PROMPT = "Write a detailed guide to cleaning and oiling a bicycle chain, in numbered steps."

STREAM_PROMPTS = [
    "Describe a good route for a Sunday bike ride along a river.",
    "Explain how bicycle gears work to a ten-year-old.",
    "Give advice for riding a bike safely in the rain.",
    "Write a short story about a lost bicycle finding its owner.",
]


# -- HTTP clients ------------------------------------------------------------------------


@dataclass
class Reply:
    """One streamed completion as the client saw it."""

    started: float
    first: float | None = None
    last: float | None = None
    ended: float = 0.0
    text: str = ""
    chunks: int = 0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        """Seconds from sending the request to the first piece of text."""
        return (self.first if self.first is not None else self.ended) - self.started

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's usage count, else the number of text chunks."""
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one."""
        if self.first is None or self.last is None or self.last <= self.first or self.tokens < 2:
            return 0.0
        return (self.tokens - 1) / (self.last - self.first)

    @property
    def complete(self) -> bool:
        """A full reply: a normal finish reason and some text."""
        return self.finish_reason in ("stop", "length") and bool(self.text.strip())


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Reply:
    """POST a streaming chat completion and record when each piece arrived."""
    reply = Reply(started=time.perf_counter())
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers or {}
        ) as response:
            if response.status_code != 200:
                reply.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return reply
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    reply.error = str(event["error"])
                    continue
                if event.get("usage"):
                    reply.usage_tokens = event["usage"].get("completion_tokens")
                    reply.prompt_tokens = event["usage"].get("prompt_tokens")
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        now = time.perf_counter()
                        reply.first = reply.first if reply.first is not None else now
                        reply.last = now
                        reply.text += content
                        reply.chunks += 1
                    if choice.get("finish_reason"):
                        reply.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    finally:
        reply.ended = time.perf_counter()
    return reply


class Target:
    """A server under test: how it is asked for the next turn of a conversation."""

    name = ""

    def __init__(self, url: str) -> None:
        self.url = url

    async def turn(
        self,
        client: httpx.AsyncClient,
        conversation: Conversation,
        user: str,
        max_tokens: int,
    ) -> Reply:
        """Send one user message of `conversation` and stream the reply."""
        raise NotImplementedError


@dataclass
class Conversation:
    """A conversation as the client keeps it."""

    key: str
    system: str
    history: list[Message] = field(default_factory=list)


class Parlour(Target):
    """parlour: only the new message, with x-session-key; history lives on the server."""

    name = "parlour"

    async def turn(
        self,
        client: httpx.AsyncClient,
        conversation: Conversation,
        user: str,
        max_tokens: int,
    ) -> Reply:
        messages: list[Message] = []
        if not conversation.history:
            messages.append({"role": "system", "content": conversation.system})
        messages.append({"role": "user", "content": user})
        reply = await stream_chat(
            client,
            self.url,
            {
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            {"x-session-key": conversation.key},
        )
        conversation.history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply.text},
        ]
        return reply


class Peer(Target):
    """llama_cpp.server: stateless, so the whole history goes with every turn."""

    name = "llama_cpp.server"

    async def turn(
        self,
        client: httpx.AsyncClient,
        conversation: Conversation,
        user: str,
        max_tokens: int,
    ) -> Reply:
        messages = [
            {"role": "system", "content": conversation.system},
            *conversation.history,
            {"role": "user", "content": user},
        ]
        reply = await stream_chat(
            client,
            self.url,
            {
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "repeat_penalty": REPEAT_PENALTY,
                "stream": True,
            },
        )
        conversation.history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply.text},
        ]
        return reply


class ParlourStateless(Peer):
    """parlour with no session (PARLOUR_SESSIONLESS=stateless): the whole history every turn,
    like the peer; the embedded backend reuses evaluated state by token prefix."""

    name = "parlour stateless"


# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Setup:
    """What parlour runs, so the peer and raw llama-cpp-python can run the same."""

    source: Path  # the GGUF named (or embedded)
    model_arg: str | None  # parlour's --model, None for its embedded default
    threads: int
    batch_threads: int
    flash_attn: bool
    convert: str | None  # weight type parlour converts the file to, if any
    weights: Path | None = None  # the file parlour actually loaded, once known

    @classmethod
    def plan(cls, model: str | None, threads: int) -> Setup:
        """parlour's own choices for this model, read from the backend it would build."""
        from parlour.backends.registry import build_backend
        from parlour.models import embedded_spec, spec_from_argument

        spec = spec_from_argument(model) if model else embedded_spec()
        backend: Any = build_backend(spec, threads=threads)
        return cls(
            source=Path(backend.path),
            model_arg=model,
            threads=int(backend.threads),
            batch_threads=int(getattr(backend, "batch_threads", backend.threads)),
            flash_attn=bool(getattr(backend, "flash_attn", False)),
            convert=getattr(backend, "weights", None),
        )

    def find_weights(self, data_dir: Path) -> Path:
        """The file parlour loaded: its converted copy in the cache, else the source."""
        if self.convert:
            copies = sorted((data_dir / "cache").glob(f"*.{self.convert}.*.gguf"))
            if not copies:
                raise RuntimeError(f"parlour converted no {self.convert} copy in {data_dir}")
            self.weights = copies[-1]
        else:
            self.weights = self.source
        return self.weights

    def describe(self) -> str:
        """One line for the output."""
        loaded = self.weights.name if self.weights else "?"
        how = f"converted by parlour to {self.convert}: {loaded}" if self.convert else "as is"
        return (
            f"weights: {self.source.name} ({how}); peer and raw load the same file; threads "
            f"{self.threads}, batch threads {self.batch_threads}; flash attention "
            f"{'on' if self.flash_attn else 'off'} (parlour's setting, given to all)"
        )


@contextmanager
def process(
    command: Sequence[str], env: dict[str, str], ready: Callable[[str], bool], log: Path
) -> Iterator[str]:
    """Run a server on a free port (`{port}` in `command`), yield its URL once `ready`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [part.format(port=port) for part in command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 300
        while not ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def answers(path: str) -> Callable[[str], bool]:
    """A readiness check: GET `path` returns 200."""

    def check(url: str) -> bool:
        try:
            return httpx.get(f"{url}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def peer_python(mode: str) -> tuple[Path, str]:
    """The interpreter for llama_cpp.server and a line saying where it comes from."""
    version = importlib.metadata.version("llama-cpp-python")
    fallback = Path(sys.executable)
    if mode == "main":
        return fallback, f"project .venv (--peer-env main), llama-cpp-python {version}"
    python = PEER_VENV / "bin" / "python"
    probe = "import importlib.metadata as m, llama_cpp.server.app, sse_starlette, starlette_context"
    probe += "; print(m.version('llama-cpp-python'))"
    if python.exists():
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
        if found.returncode == 0 and found.stdout.strip() == version:
            return python, f"bench venv {PEER_VENV.relative_to(ROOT)}, llama-cpp-python {version}"
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "--format=abspath", "llama_cpp_python"],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = [
        line
        for line in listed.stdout.split()
        if Path(line).name.startswith(f"llama_cpp_python-{version}-")
    ]
    if not wheels:
        return fallback, (
            f"FALLBACK project .venv: no cached llama-cpp-python {version} wheel, and "
            "installing it into a bench venv would build it from source"
        )
    shutil.rmtree(PEER_VENV, ignore_errors=True)
    steps: list[list[str]] = [
        [sys.executable, "-m", "venv", str(PEER_VENV)],
        # --only-binary: the cached wheel itself, and wheels for the server extras; nothing
        # is ever compiled here.
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--only-binary",
            ":all:",
            f"{wheels[0]}[server]",
        ],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return fallback, f"FALLBACK project .venv: setting up the bench venv failed ({tail})"
    return python, f"bench venv {PEER_VENV.relative_to(ROOT)} (new), llama-cpp-python {version}"


@contextmanager
def parlour_server(setup: Setup, workdir: Path) -> Iterator[str]:
    """`parlour serve` with the model on a temp data directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
    env["PARLOUR_LLAMA_THREADS"] = str(setup.threads)
    # Requests without x-session-key (the stateless target) are answered, not refused.
    env["PARLOUR_SESSIONLESS"] = "stateless"
    command = [
        sys.executable,
        "-m",
        "parlour",
        "serve",
        "--port",
        "{port}",
        "--data-dir",
        str(workdir / "parlour"),
        "--log-level",
        "warning",
        *(["--model", setup.model_arg] if setup.model_arg else []),
    ]
    with process(command, env, answers("/health"), workdir / "parlour.log") as url:
        setup.find_weights(workdir / "parlour")
        yield url


@contextmanager
def peer_server(python: Path, setup: Setup, workdir: Path) -> Iterator[str]:
    """llama_cpp.server on the same weights and settings, with the AMX-safe load setting."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)  # the launcher imports that setting from parlour
    command = [
        str(python),
        str(ROOT / "tests" / "support" / "llama_server.py"),
        "--model",
        str(setup.weights),
        "--n_threads",
        str(setup.threads),
        "--n_threads_batch",
        str(setup.batch_threads),
        "--n_ctx",
        str(CONTEXT),
        "--flash_attn",
        str(setup.flash_attn).lower(),
        # Its default computes logits for every prompt token; off, its prompts are faster.
        "--logits_all",
        "false",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
    ]
    with process(command, env, answers("/v1/models"), workdir / "peer.log") as url:
        yield url


# -- raw llama-cpp-python ----------------------------------------------------------------


class Raw:
    """llama-cpp-python's `Llama` in this process: the decode ceiling."""

    name = "raw llama-cpp-python"

    def __init__(self, setup: Setup) -> None:
        import llama_cpp
        from llama_cpp import Llama

        from parlour.backends.llama import _without_extra_buffer_types

        with _without_extra_buffer_types():
            self.llm = Llama(
                model_path=str(setup.weights),
                n_ctx=CONTEXT,
                n_threads=setup.threads,
                n_threads_batch=setup.batch_threads,
                flash_attn=setup.flash_attn,
                verbose=False,
            )
        self.is_eog: Callable[[int], bool] = lambda token: bool(
            llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token)
        )

    def run(self, messages: list[Message], max_tokens: int) -> Reply:
        """Greedy generation through `Llama.generate`; times each token as it is sampled."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        prompt = self.llm.tokenize(f"{text}<|im_start|>assistant\n".encode(), False, True)
        reply = Reply(started=time.perf_counter())
        count = 0
        for token in self.llm.generate(prompt, temp=0.0, repeat_penalty=REPEAT_PENALTY):
            if self.is_eog(token):
                reply.finish_reason = "stop"
                break
            now = time.perf_counter()
            reply.first = reply.first if reply.first is not None else now
            reply.last = now
            count += 1
            if count >= max_tokens:
                reply.finish_reason = "length"
                break
        reply.ended = time.perf_counter()
        reply.usage_tokens = count
        reply.text = "x" if count else ""
        return reply

    def close(self) -> None:
        """Free the model."""
        self.llm.close()


# -- measurements ------------------------------------------------------------------------


def unique() -> str:
    """A short id that keeps one request's prompt from sharing a prefix with another's."""
    return uuid.uuid4().hex[:8]


async def single(target: Target, max_tokens: int) -> Reply:
    """One stream, new conversation."""
    conversation = Conversation(
        key=f"single-{unique()}", system=f"Ticket {unique()}. You are a helpful assistant."
    )
    async with httpx.AsyncClient(timeout=600) as client:
        return await target.turn(client, conversation, SINGLE_PROMPT, max_tokens)


async def simultaneous(target: Target, max_tokens: int, streams: int) -> tuple[list[Reply], float]:
    """`streams` new conversations started at the same moment; replies and wall seconds."""
    conversations = [
        Conversation(key=f"burst-{unique()}", system=f"Ticket {unique()}. You are helpful.")
        for _ in range(streams)
    ]
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        began = time.perf_counter()
        replies = await asyncio.gather(
            *(
                target.turn(client, c, STREAM_PROMPTS[i % len(STREAM_PROMPTS)], max_tokens)
                for i, c in enumerate(conversations)
            )
        )
        return list(replies), time.perf_counter() - began


async def interleaved(
    target: Target, max_tokens: int, conversations: int, turns: int
) -> list[list[Reply]]:
    """Round-robin turns of several conversations; replies[turn][conversation]."""
    run = unique()
    convs = [
        Conversation(
            key=f"conv-{run}-{i}",
            system=f"You are speaking with {CUSTOMERS[i % len(CUSTOMERS)]} (conversation "
            f"{run}-{i}).\n\n{POLICY}",
        )
        for i in range(conversations)
    ]
    replies: list[list[Reply]] = []
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in range(turns):
            row = []
            for i, conversation in enumerate(convs):
                user = TURNS[i % len(TURNS)][turn % len(TURNS[0])]
                row.append(await target.turn(client, conversation, user, max_tokens))
            replies.append(row)
    return replies


# -- reporting ---------------------------------------------------------------------------


def load() -> str:
    """The 1/5/15-minute load averages."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """Median with the range over repeats."""
    if not values:
        return "-"
    middle = fmt.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a Markdown table."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def errors(replies: Sequence[Reply]) -> str:
    """The first error any reply carried, for the notes under a table."""
    found = [r.error for r in replies if r.error]
    return f" first error: {found[0]}" if found else ""


Summary = dict[str, dict[str, float]]  # target name -> measure -> median


async def run_single(
    targets: list[Target], raw: Raw | None, repeats: int, max_tokens: int, summary: Summary
) -> None:
    """Single-stream TTFT and decode rate, raw llama-cpp-python as the ceiling."""
    results: dict[str, list[Reply]] = {t.name: [] for t in targets}
    if raw is not None:
        results[raw.name] = []
    for repeat in range(repeats):
        order: list[Target] = targets if repeat % 2 == 0 else targets[::-1]
        for target in order:
            results[target.name].append(await single(target, max_tokens))
        if raw is not None:
            results[raw.name].append(
                raw.run(
                    [
                        {"role": "system", "content": f"Ticket {unique()}. You are helpful."},
                        {"role": "user", "content": SINGLE_PROMPT},
                    ],
                    max_tokens,
                )
            )
    ceiling = statistics.median(r.decode_rate for r in results[raw.name]) if raw else 0.0
    rows = []
    for name, replies in results.items():
        rate = statistics.median(r.decode_rate for r in replies)
        summary.setdefault(name, {})["decode"] = rate
        if ceiling:
            summary[name]["of raw"] = rate / ceiling
        rows.append(
            [
                name,
                spread([r.ttft * 1000 for r in replies]),
                spread([r.decode_rate for r in replies], "{:.1f}"),
                f"{100 * rate / ceiling:.0f}%" if ceiling else "-",
                spread([float(r.tokens) for r in replies]),
            ]
        )
    table(
        f"Single stream, max_tokens {max_tokens}, median (min-max) of {repeats}; "
        f"load after: {load()}",
        ["server", "TTFT ms", "decode tok/s", "of raw", "tokens"],
        rows,
    )
    for name, replies in results.items():
        if any(r.error for r in replies):
            print(f"\n{name}:{errors(replies)}")


async def run_streams(
    targets: list[Target], repeats: int, max_tokens: int, streams: int, summary: Summary
) -> None:
    """Simultaneous streams: completed replies and aggregate throughput."""
    results: dict[str, list[tuple[list[Reply], float]]] = {t.name: [] for t in targets}
    for repeat in range(repeats):
        order = targets if repeat % 2 == 0 else targets[::-1]
        for target in order:
            results[target.name].append(await simultaneous(target, max_tokens, streams))
    rows = []
    for name, runs in results.items():
        summary.setdefault(name, {}).update(
            complete=statistics.median(sum(r.complete for r in replies) for replies, _ in runs),
            aggregate=statistics.median(
                sum(r.tokens for r in replies) / wall for replies, wall in runs
            ),
        )
        rows.append(
            [
                name,
                spread([float(sum(r.complete for r in replies)) for replies, _ in runs]),
                spread([sum(r.tokens for r in replies) / wall for replies, wall in runs], "{:.1f}"),
                spread([max(r.ttft for r in replies) * 1000 for replies, _ in runs]),
                spread([wall for _, wall in runs], "{:.1f}"),
                spread([float(sum(r.tokens for r in replies)) for replies, _ in runs]),
            ]
        )
    table(
        f"{streams} simultaneous streams, max_tokens {max_tokens}, median (min-max) of "
        f"{repeats}; load after: {load()}",
        [
            "server",
            f"complete (of {streams})",
            "aggregate tok/s",
            "slowest TTFT ms",
            "wall s",
            "tokens",
        ],
        rows,
    )
    for name, runs in results.items():
        replies = [r for rs, _ in runs for r in rs]
        cut = [r for r in replies if not r.complete]
        if cut:
            reasons = sorted({str(r.finish_reason) for r in cut})
            print(
                f"\n{name}: {len(cut)} of {len(replies)} replies incomplete "
                f"(finish_reason {', '.join(reasons)}; tokens "
                f"{', '.join(str(r.tokens) for r in cut)}).{errors(replies)}"
            )


async def run_interleaved(
    targets: list[Target],
    repeats: int,
    max_tokens: int,
    conversations: int,
    turns: int,
    summary: Summary,
) -> None:
    """Round-robin conversations: TTFT per turn, mean over the conversations."""
    results: dict[str, list[list[list[Reply]]]] = {t.name: [] for t in targets}
    for repeat in range(repeats):
        order = targets if repeat % 2 == 0 else targets[::-1]
        for target in order:
            results[target.name].append(await interleaved(target, max_tokens, conversations, turns))

    def mean_ttft(run: list[list[Reply]], turn: int) -> float:
        return statistics.fmean(r.ttft for r in run[turn]) * 1000

    header = ["turn"]
    for target in targets:
        header.append(f"{target.name} TTFT ms")
    header.append("prompt tokens")
    rows = []
    prompts = results.get(Parlour.name, [])
    for turn in range(turns):
        row = [str(turn + 1)]
        for target in targets:
            row.append(spread([mean_ttft(run, turn) for run in results[target.name]]))
        counts = [r.prompt_tokens for run in prompts for r in run[turn] if r.prompt_tokens]
        row.append(f"{statistics.fmean(counts):.0f}" if counts else "-")
        rows.append(row)
    ratio = [f"turn {turns} / turn 1"]
    for target in targets:
        ratios = [mean_ttft(run, turns - 1) / mean_ttft(run, 0) for run in results[target.name]]
        summary.setdefault(target.name, {})["ttft ratio"] = statistics.median(ratios)
        ratio.append(spread(ratios, "{:.2f}x"))
    ratio.append("")
    rows.append(ratio)
    table(
        f"{conversations} conversations interleaved round-robin for {turns} turns, max_tokens "
        f"{max_tokens}, TTFT mean over the conversations, median (min-max) of {repeats}; "
        f"load after: {load()}",
        header,
        rows,
    )
    for name, runs in results.items():
        replies = [r for run in runs for row in run for r in row]
        bad = [r for r in replies if not r.complete]
        if bad:
            print(f"\n{name}: {len(bad)} of {len(replies)} turns incomplete.{errors(replies)}")


def print_targets(summary: Summary, streams: int, turns: int) -> None:
    """The issue's targets next to what this run measured."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("\nTargets (benchmarks, not assertions)\n")
    for name in (Parlour.name, ParlourStateless.name, Peer.name):
        got = summary.get(name, {})
        lines = []
        if "of raw" in got:
            lines.append(
                f"single-stream decode >= 95% of raw: {100 * got['of raw']:.0f}% "
                f"-> {verdict(got['of raw'] >= 0.95)}"
            )
        if "complete" in got:
            single = got.get("decode", 0.0)
            ok = got["complete"] >= streams and got["aggregate"] >= single > 0
            against = f" vs single {single:.1f}" if single else ""
            lines.append(
                f"{streams} streams: {got['complete']:.0f}/{streams} complete, aggregate "
                f"{got['aggregate']:.1f} tok/s{against} -> {verdict(ok)}"
            )
        if "ttft ratio" in got:
            lines.append(
                f"interleaved TTFT turn {turns} / turn 1 <= 1.5x: {got['ttft ratio']:.2f}x "
                f"-> {verdict(got['ttft ratio'] <= 1.5)}"
            )
        for line in lines:
            print(f"- {name}: {line}")


async def main() -> None:
    """Start both servers, run the chosen parts, print the tables."""
    from parlour.backends.llama import default_threads

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--model", help="a .gguf for all three, loaded as is [parlour's default]")
    parser.add_argument("--parts", nargs="+", default=["single", "streams", "interleaved"])
    parser.add_argument("--peer-env", choices=["auto", "main"], default="auto")
    parser.add_argument("--single-tokens", type=int, default=128)
    # Single streams take seconds, and their decode rate is the noisiest number here.
    parser.add_argument("--single-repeats", type=int, default=7)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--stream-tokens", type=int, default=96)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=48)
    args = parser.parse_args()

    python, where = peer_python(args.peer_env)
    setup = Setup.plan(args.model, args.threads)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
    )
    print(f"peer: llama_cpp.server from {where}")
    print(f"load average at start: {load()}")
    summary: Summary = {}
    with tempfile.TemporaryDirectory(prefix="bench-sessions-") as temp:
        workdir = Path(temp)
        with (
            parlour_server(setup, workdir) as parlour_url,
            peer_server(python, setup, workdir) as peer_url,
        ):
            print(setup.describe())
            targets: list[Target] = [
                Parlour(parlour_url),
                ParlourStateless(parlour_url),
                Peer(peer_url),
            ]
            for target in targets:  # warm-up: first-request setup, page cache
                await single(target, 8)
            if "single" in args.parts:
                raw = Raw(setup)
                try:
                    await run_single(targets, raw, args.single_repeats, args.single_tokens, summary)
                finally:
                    raw.close()
            if "streams" in args.parts:
                await run_streams(targets, args.repeats, args.stream_tokens, args.streams, summary)
            if "interleaved" in args.parts:
                await run_interleaved(
                    targets,
                    args.repeats,
                    args.turn_tokens,
                    args.conversations,
                    args.turns,
                    summary,
                )
    print_targets(summary, args.streams, args.turns)
    print(f"\nload average at end: {load()}")


if __name__ == "__main__":
    asyncio.run(main())
