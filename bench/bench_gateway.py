"""Gateway cost: what parlour adds around a model that answers instantly.

Two tables, every row measured in the same run:

1. Persisted turns with the scripted backend (instant): non-streamed
   `POST /v1/chat/completions` with `x-session-key`, on SQLite and on a fresh
   PostgreSQL database, at 1 and 16 connections. Each connection has its own
   session (a new one every `--turns-per-session` turns). Two more rows: 16
   connections sharing 4 sessions (turns queue on each conversation's lock), and 16
   connections paced to `--paced` turns/s in all, for latency at a given load.
2. Gateways in front of the same instant fake upstream (tests/support/fake_upstream.py):
   the upstream alone (what the load generator and one small server can do),
   parlour's `openai` backend (persisted turns, SQLite) and LiteLLM proxy (stateless,
   from a bench-only virtualenv, bench/.peers/litellm, that this script creates).
(Metrics and limits off against on: `python -m bench.bench_operations_gateway`.)

The load generator runs in this process: keep-alive HTTP/1.1 connections on asyncio
streams (`--client httpx` uses httpx instead, which costs several times more CPU per
request). It shares the machine's cores with the servers it measures. Each row also
gives the server's own CPU time per request, which depends far less on that sharing.

    python bench/bench_gateway.py [--seconds 10] [--connections 1 16] [--paced 1000]
        [--turns-per-session 50] [--databases sqlite postgresql] [--no-litellm]
        [--only persisted upstream]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
LITELLM_ENV = ROOT / "bench" / ".peers" / "litellm"
POSTGRES_ADMIN = os.environ.get(
    "PARLOUR_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: Words in each fake upstream reply.
UPSTREAM_WORDS = 20
CHAT = "/v1/chat/completions"

Send = Callable[[dict[str, str], bytes], Awaitable[int]]


@dataclass
class Cell:
    """One row: a configuration's completed requests, their latencies and server CPU."""

    label: str
    connections: int
    sessions: str
    #: Requests per second offered in all (None: each connection sends when it can).
    paced: float | None = None
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_seconds: float = 0.0
    failure: str | None = None

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        """The server's CPU time per completed request, in milliseconds."""
        done = len(self.latencies_ms)
        return 1000 * self.cpu_seconds / done if done else float("nan")

    def percentile(self, q: float) -> float:
        """A latency percentile in milliseconds."""
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def machine() -> str:
    """The CPU model, how many cores this process may use, and the load right now."""
    model = "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {len(os.sched_getaffinity(0))} cores, load average {load}"


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        total += used.get(current, 0.0)
        pending.extend(children.get(current, []))
    return total


class Connection:
    """One keep-alive HTTP/1.1 connection: a load generator far cheaper than a full client,
    so that the server, not the generator, sets the rate."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """Send one POST and read the whole reply; reconnects once if the server closed."""
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            self.writer.write(
                f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"{head}\r\n".encode("latin-1")
                + body
            )
            try:
                return await self._response(self.reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            payload = await reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append((await reader.readexactly(size + 2))[:-2])
            await reader.readuntil(b"\r\n")
            payload = b"".join(parts)
        else:
            payload = await reader.read()
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        """Close the socket."""
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class Server:
    """A child process serving HTTP on a port, with its output kept in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )

    def cpu(self) -> float:
        """CPU seconds the server's processes have used so far."""
        return process_cpu(self.process.pid)

    def wait_ready(self, path: str, timeout: float) -> None:
        """Poll `path` until it answers 200; raise with the log's tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
        self.stop()
        raise RuntimeError(f"{self.name} did not start: " + " / ".join(tail))

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.unlink(missing_ok=True)


@contextlib.contextmanager
def serving(server: Server, path: str, timeout: float = 120) -> Iterator[Server]:
    """Wait for the server to answer, and stop it when the block ends."""
    try:
        server.wait_ready(path, timeout)
        yield server
    finally:
        server.stop()


def parlour(
    database_url: str,
    data_dir: Path,
    *,
    model: str,
    config: Path | None,
    settings: dict[str, str] | None = None,
) -> Server:
    """`parlour serve` on a free port, logging warnings only (no access log)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
    env.update(settings or {})
    env["PARLOUR_DATABASE_URL"] = database_url
    argv = [sys.executable, "-m", "parlour", "serve", "--model", model, "--port", str(port)]
    argv += ["--data-dir", str(data_dir), "--log-level", "warning"]
    if config is not None:
        argv += ["--config", str(config)]
    return Server("parlour", argv, env, port)


def fake_upstream() -> Server:
    """The instant fake OpenAI-compatible upstream."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port)]
    argv += ["--words", str(UPSTREAM_WORDS)]
    return Server("fake-upstream", argv, dict(os.environ), port)


def litellm_ready() -> str | None:
    """Create the bench-only LiteLLM virtualenv if needed; None when usable, else why not."""
    binary = LITELLM_ENV / "bin" / "litellm"
    if binary.exists():
        return None
    print("  installing litellm[proxy] into bench/.peers/litellm ...", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_ENV)], check=True)
        subprocess.run(
            [str(LITELLM_ENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
            check=True,
            capture_output=True,
            timeout=1800,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"install failed ({type(exc).__name__})"
    return None if binary.exists() else "install produced no litellm command"


def litellm(upstream: Server, workdir: Path, master_key: str) -> Server:
    """LiteLLM proxy routing model `fake` to the fake upstream as an OpenAI-compatible API.

    It refuses to start without a master key (its clients then send it as a bearer token).
    """
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake\n"
        "    litellm_params:\n"
        "      model: openai/fake\n"
        f"      api_base: {upstream.url}/v1\n"
        "      api_key: sk-fake\n"
        "litellm_settings:\n"
        "  set_verbose: false\n"
        "  json_logs: false\n"
        "  telemetry: false\n",
        encoding="utf-8",
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "OPENAI"))}
    # Quiet, and no fetching of the model price list from the internet at start-up.
    env.update(
        LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MASTER_KEY=master_key
    )
    argv = [str(LITELLM_ENV / "bin" / "litellm"), "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return Server("litellm", argv, env, port)


@contextlib.asynccontextmanager
async def fresh_postgres() -> AsyncIterator[str]:
    """A new empty PostgreSQL database, dropped afterwards; yields its asyncpg URL."""
    name = f"parlour_bench_{uuid.uuid4().hex[:10]}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    await admin(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Load:
    """What the load generator sends."""

    connections: int
    #: Extra fields of every request body (the model).
    body: dict[str, Any]
    #: None: no session header; 0: a session per connection; N: N sessions shared by all.
    sessions: int | None
    turns_per_session: int
    client: str
    paced: float | None = None
    #: Sent with every request (LiteLLM's master key).
    headers: dict[str, str] = field(default_factory=dict)


async def drive(url: str, load: Load, seconds: float, cell: Cell | None = None) -> None:
    """Send non-streamed chat requests for `seconds`; record them in `cell` when given.

    Paced, each connection sends on a fixed schedule and latency counts from the time a
    request was due, so a server that falls behind is charged for the wait.
    """
    began = time.perf_counter()
    deadline = began + seconds
    run = uuid.uuid4().hex[:8]
    target = httpx.URL(url)

    def request(index: int, turn: int, generation: int) -> tuple[dict[str, str], bytes]:
        headers = dict(load.headers)
        if load.sessions == 0:
            headers["x-session-key"] = f"bench-{run}-{index}-{generation}"
        elif load.sessions is not None:
            headers["x-session-key"] = f"bench-{run}-shared-{index % load.sessions}-{generation}"
        message = {"role": "user", "content": f"hello turn {turn}"}
        return headers, json.dumps({**load.body, "messages": [message]}).encode()

    async def client_loop(send: Send, index: int) -> None:
        generation, turn = 0, 0
        # A shared session lasts about as many turns in all as one of a connection's own.
        sharers = load.connections // load.sessions if load.sessions else 1
        session_turns = max(1, load.turns_per_session // sharers)
        interval = load.connections / load.paced if load.paced else 0.0
        due = began + (index / load.paced if load.paced else 0.0)
        while True:
            now = time.perf_counter()
            if interval:
                # Requests still due when time is up are not sent (the rate shows it).
                if due >= deadline or now >= deadline:
                    break
                if due > now:
                    await asyncio.sleep(due - now)
                start, due = due, due + interval
            elif now >= deadline:
                break
            else:
                start = now
            if load.turns_per_session and turn >= session_turns:
                generation, turn = generation + 1, 0
            headers, payload = request(index, turn, generation)
            try:
                ok = await send(headers, payload) == 200
            except (OSError, httpx.HTTPError, asyncio.IncompleteReadError, TimeoutError):
                ok = False
            if cell is not None:
                if ok:
                    cell.latencies_ms.append((time.perf_counter() - start) * 1000)
                else:
                    cell.errors += 1
            turn += 1

    if load.client == "httpx":
        limits = httpx.Limits(max_connections=load.connections)
        async with httpx.AsyncClient(limits=limits, timeout=60) as pool:

            async def send_httpx(headers: dict[str, str], payload: bytes) -> int:
                headers = {**headers, "content-type": "application/json"}
                return (await pool.post(target, headers=headers, content=payload)).status_code

            await asyncio.gather(*(client_loop(send_httpx, i) for i in range(load.connections)))
        return
    sockets = [Connection(target.host, target.port or 80) for _ in range(load.connections)]

    def sender(conn: Connection) -> Send:
        async def send(headers: dict[str, str], payload: bytes) -> int:
            post = conn.post(target.raw_path.decode(), headers, payload)
            status, _ = await asyncio.wait_for(post, 60)
            return status

        return send

    try:
        await asyncio.gather(*(client_loop(sender(c), i) for i, c in enumerate(sockets)))
    finally:
        for conn in sockets:
            await conn.close()


async def measure(cell: Cell, server: Server, load: Load, args: argparse.Namespace) -> None:
    """Warm up, then measure one cell with the server's CPU time; print a progress line."""
    try:
        await drive(server.url + CHAT, load, args.warmup)
        cpu, began = server.cpu(), time.perf_counter()
        await drive(server.url + CHAT, load, args.seconds, cell)
        cell.seconds = time.perf_counter() - began
        cell.cpu_seconds = server.cpu() - cpu
    except Exception as exc:
        cell.failure = f"{type(exc).__name__}: {exc}"[:200]
    print(
        f"  {cell.label}, {cell.connections} conn, {cell.sessions}: {cell.rate:.0f}/s "
        f"p50 {cell.percentile(0.5):.1f} ms, {cell.errors} errors",
        file=sys.stderr,
        flush=True,
    )


def table(title: str, unit: str, cells: list[Cell]) -> str:
    """Render cells as a fixed-width table."""
    width = max(len(c.label) for c in cells)
    head = (
        f"{'server':<{width}} | conns | sessions   | {unit:>8} | p50 ms | p95 ms | p99 ms "
        "| CPU ms/req | errors"
    )
    lines = [title, "", head, "-" * len(head)]
    for c in cells:
        load = f"{c.sessions}, {c.paced:g}/s" if c.paced else c.sessions
        row = f"{c.label:<{width}} | {c.connections:>5} | {load:<10} | "
        if c.failure is not None:
            lines.append(row + f"not measured: {c.failure}")
            continue
        lines.append(
            row + f"{c.rate:>8.0f} | {c.percentile(0.5):>6.1f} | {c.percentile(0.95):>6.1f} | "
            f"{c.percentile(0.99):>6.1f} | {c.cpu_ms:>10.2f} | {c.errors:>6}"
        )
    return "\n".join(lines)


async def persisted_cells(label: str, database_url: str, args: argparse.Namespace) -> list[Cell]:
    """Persisted turns on one database: each connection count, shared sessions, paced."""
    most = max(args.connections)
    plan: list[tuple[Cell, Load]] = []
    for n in args.connections:
        plan.append((Cell(label, n, "own"), Load(n, {}, 0, args.turns_per_session, args.client)))
    if args.shared:
        cell = Cell(label, most, f"{args.shared} shared")
        plan.append((cell, Load(most, {}, args.shared, args.turns_per_session, args.client)))
    if args.paced:
        cell = Cell(label, most, "own", paced=args.paced)
        load = Load(most, {}, 0, args.turns_per_session, args.client, paced=args.paced)
        plan.append((cell, load))
    data_dir = Path(tempfile.mkdtemp(prefix="bench-parlour-"))
    try:
        for cell, load in plan:
            # A fresh process per row: the scripted backend keeps every call it was
            # given (tests inspect them), which would weigh on later rows.
            server = parlour(database_url, data_dir, model="scripted", config=None)
            try:
                with serving(server, "/health"):
                    await measure(cell, server, load, args)
            except RuntimeError as exc:
                cell.failure = str(exc)[:200]
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return [cell for cell, _ in plan]


async def persisted(args: argparse.Namespace) -> list[Cell]:
    """The persisted-turns table: SQLite, then PostgreSQL."""
    cells: list[Cell] = []
    if "sqlite" in args.databases:
        with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
            url = f"sqlite+aiosqlite:///{tmp}/p.db"
            cells += await persisted_cells("parlour, SQLite", url, args)
    if "postgresql" in args.databases:
        try:
            async with fresh_postgres() as url:
                cells += await persisted_cells("parlour, PostgreSQL", url, args)
        except (OSError, asyncpg.PostgresError) as exc:
            cells.append(Cell("parlour, PostgreSQL", 0, "-", failure=f"no PostgreSQL: {exc}"))
    return cells


async def gateway_rows(
    label: str,
    server: Server,
    body: dict[str, Any],
    sessions: int | None,
    args: argparse.Namespace,
    headers: dict[str, str] | None = None,
) -> list[Cell]:
    """One gateway's cells at each connection count."""
    cells = []
    for n in args.connections:
        cell = Cell(label, n, "own" if sessions == 0 else "-")
        load = Load(n, body, sessions, args.turns_per_session, args.client, headers=headers or {})
        await measure(cell, server, load, args)
        cells.append(cell)
    return cells


async def upstream(args: argparse.Namespace) -> list[Cell]:
    """The gateway table: the fake upstream alone, parlour's openai backend, LiteLLM proxy."""
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        workdir = Path(tmp)
        fake = fake_upstream()
        with serving(fake, "/stats"):
            cells += await gateway_rows("fake upstream alone", fake, {"model": "fake"}, None, args)
            config = workdir / "parlour.toml"
            config.write_text(
                'default = "up"\n\n[[models]]\nname = "up"\nbackend = "openai"\n'
                f'base_urls = ["{fake.url}/v1"]\nupstream_model = "fake"\n'
                "context_length = 8192\n",
                encoding="utf-8",
            )
            label = "parlour, openai backend, SQLite"
            server = parlour(
                f"sqlite+aiosqlite:///{workdir}/p.db", workdir / "data", model="up", config=config
            )
            try:
                with serving(server, "/health"):
                    cells += await gateway_rows(label, server, {}, 0, args)
            except RuntimeError as exc:
                cells.append(Cell(label, 0, "-", failure=str(exc)[:200]))
            label = "LiteLLM proxy (stateless)"
            why = litellm_ready() if args.litellm else "skipped (--no-litellm)"
            if why is None:
                key = f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
                proxy = litellm(fake, workdir, key)
                try:
                    with serving(proxy, "/health/liveliness", timeout=180):
                        cells += await gateway_rows(
                            label,
                            proxy,
                            {"model": "fake"},
                            None,
                            args,
                            headers={"authorization": f"Bearer {key}"},
                        )
                except RuntimeError as exc:
                    why = str(exc)[:300]
            if why is not None:
                cells.append(Cell(label, 0, "-", failure=why))
    return cells


async def main(args: argparse.Namespace) -> None:
    """Run the selected tables and print them."""
    print(f"Machine: {machine()}.")
    client = "httpx" if args.client == "httpx" else "raw keep-alive HTTP/1.1 on asyncio"
    print(
        f"Load generator: {client}, in one process on the same cores as the servers.\n"
        f"{args.seconds:g} s per row after {args.warmup:g} s of warm-up; non-streamed "
        f"requests; a session lasts {args.turns_per_session or 'unlimited'} turns.\n"
        "With N connections always busy, mean latency is N / rate (Little's law); the paced "
        "row shows latency at a fixed load.\n",
        flush=True,
    )
    if "persisted" in args.only:
        cells = await persisted(args)
        print(table("Persisted turns, scripted backend (instant)", "turns/s", cells))
        print(flush=True)
    if "upstream" in args.only:
        cells = await upstream(args)
        title = f"In front of the same instant fake upstream ({UPSTREAM_WORDS}-word replies)"
        print(table(title, "req/s", cells))
    print(f"\nAfterwards: {machine()}.")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--turns-per-session",
        type=int,
        default=50,
        help="start a fresh session after this many turns (0: one session per connection)",
    )
    parser.add_argument(
        "--shared", type=int, default=4, help="sessions the shared-session row uses (0: no row)"
    )
    parser.add_argument(
        "--paced", type=float, default=1000.0, help="turns/s of the paced row (0: no row)"
    )
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw")
    parser.add_argument(
        "--databases",
        nargs="+",
        choices=["sqlite", "postgresql"],
        default=["sqlite", "postgresql"],
        help="where the persisted turns go (PostgreSQL: a fresh database, $PARLOUR_BENCH_POSTGRES)",
    )
    parser.add_argument("--no-litellm", dest="litellm", action="store_false")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["persisted", "upstream"],
        default=["persisted", "upstream"],
    )
    return parser.parse_args()


if __name__ == "__main__":
    # Plain asyncio for the load generator, whatever the servers run on.
    asyncio.run(main(parse_args()))
