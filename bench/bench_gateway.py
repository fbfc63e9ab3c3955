"""Gateway cost: what parlour adds around a model that answers instantly.

Two tables, every row measured in the same run:

1. Persisted turns with the scripted backend (instant): non-streamed
   `POST /v1/chat/completions` with `x-session-key`, on SQLite and on a fresh
   PostgreSQL database, at 1 and 16 connections. Each connection has its own
   session (a new one every `--turns-per-session` turns), plus a row where 16
   connections share 4 sessions, so turns queue on each conversation's lock.
2. Gateways in front of the same instant fake upstream (tests/support/fake_upstream.py):
   the upstream directly (the load generator's ceiling), parlour's `openai` backend
   (persisted turns, SQLite), and LiteLLM proxy (stateless, from a bench-only
   virtualenv in bench/.peers/litellm that this script creates).

The load generator (asyncio + httpx, keep-alive, in this process) shares the
machine's cores with the servers it measures.

    python bench/bench_gateway.py [--seconds 10] [--connections 1 16] [--no-postgres]
                                  [--no-litellm] [--only persisted upstream]
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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / ".peers"
LITELLM_ENV = PEERS / "litellm"
POSTGRES_ADMIN = os.environ.get(
    "PARLOUR_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: Words in each fake upstream reply.
UPSTREAM_WORDS = 20


@dataclass
class Cell:
    """One row: a configuration's completed requests and their latencies."""

    label: str
    connections: int
    sessions: str
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    failure: str | None = None

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

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
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            payload = await reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size + 2))
            await reader.readuntil(b"\r\n")
            payload = b"".join(p[:-2] for p in parts)
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


def machine() -> str:
    """The CPU model and how many cores this process may use."""
    model = "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


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

    def wait_ready(self, path: str, timeout: float) -> None:
        """Poll `path` until it answers 200; raise with the log's tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
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


def parlour(database_url: str, data_dir: Path, *, model: str, config: Path | None) -> Server:
    """`parlour serve` on a free port, logging warnings only (no access log)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
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


async def postgres_admin(statement: str) -> None:
    """Run one statement on the PostgreSQL server's admin database."""
    connection = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def fresh_postgres() -> Any:
    """A new empty PostgreSQL database, dropped afterwards; yields its asyncpg URL."""
    name = f"parlour_bench_{uuid.uuid4().hex[:10]}"
    await postgres_admin(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        await postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def drive(
    url: str,
    *,
    connections: int,
    seconds: float,
    body: dict[str, Any],
    sessions: int | None,
    turns_per_session: int,
    client: str = "raw",
    cell: Cell | None = None,
) -> None:
    """Send non-streamed chat requests from `connections` clients for `seconds`.

    With `sessions` None no session header is sent; with 0 each connection has its own
    session, renewed every `turns_per_session` turns (0: never); otherwise the connections
    share that many sessions. Latencies and errors go into `cell` when given.
    """
    deadline = time.perf_counter() + seconds
    run = uuid.uuid4().hex[:8]
    target = httpx.URL(url)

    def request(index: int, turn: int, generation: int) -> tuple[dict[str, str], bytes]:
        headers: dict[str, str] = {}
        if sessions == 0:
            headers["x-session-key"] = f"bench-{run}-{index}-{generation}"
        elif sessions is not None:
            headers["x-session-key"] = f"bench-{run}-shared-{index % sessions}"
        payload = {**body, "messages": [{"role": "user", "content": f"hello turn {turn}"}]}
        return headers, json.dumps(payload).encode()

    async def client_loop(
        send: Callable[[dict[str, str], bytes], Awaitable[int]], index: int
    ) -> None:
        generation, turn = 0, 0
        while time.perf_counter() < deadline:
            if turns_per_session and turn >= turns_per_session:
                generation, turn = generation + 1, 0
            headers, payload = request(index, turn, generation)
            began = time.perf_counter()
            try:
                ok = await send(headers, payload) == 200
            except (OSError, httpx.HTTPError, asyncio.IncompleteReadError):
                ok = False
            if cell is not None:
                if ok:
                    cell.latencies_ms.append((time.perf_counter() - began) * 1000)
                else:
                    cell.errors += 1
            turn += 1

    if client == "httpx":
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=60) as pool:

            async def send_httpx(headers: dict[str, str], payload: bytes) -> int:
                headers = {**headers, "content-type": "application/json"}
                return (await pool.post(target, headers=headers, content=payload)).status_code

            await asyncio.gather(*(client_loop(send_httpx, i) for i in range(connections)))
        return
    sockets = [Connection(target.host, target.port or 80) for _ in range(connections)]

    def sender(conn: Connection) -> Callable[[dict[str, str], bytes], Awaitable[int]]:
        async def send(headers: dict[str, str], payload: bytes) -> int:
            status, _ = await asyncio.wait_for(
                conn.post(target.raw_path.decode(), headers, payload), 60
            )
            return status

        return send

    try:
        await asyncio.gather(*(client_loop(sender(c), i) for i, c in enumerate(sockets)))
    finally:
        for conn in sockets:
            await conn.close()


async def measure(
    cell: Cell,
    url: str,
    *,
    body: dict[str, Any],
    sessions: int | None,
    args: argparse.Namespace,
) -> Cell:
    """Warm up, then measure one cell; print a progress line."""
    options = {
        "connections": cell.connections,
        "body": body,
        "sessions": sessions,
        "client": args.client,
    }
    await drive(url, seconds=args.warmup, turns_per_session=args.turns_per_session, **options)
    began = time.perf_counter()
    await drive(
        url, seconds=args.seconds, turns_per_session=args.turns_per_session, cell=cell, **options
    )
    cell.seconds = time.perf_counter() - began
    print(
        f"  {cell.label}, {cell.connections} conn, {cell.sessions}: {cell.rate:.0f}/s "
        f"p50 {cell.percentile(0.5):.1f} ms, {cell.errors} errors",
        file=sys.stderr,
        flush=True,
    )
    return cell


def table(title: str, unit: str, cells: list[Cell]) -> str:
    """Render cells as a fixed-width table."""
    width = max(len(c.label) for c in cells)
    head = f"{'server':<{width}} | conns | sessions | {unit:>8} | p50 ms | p95 ms | p99 ms | errors"
    lines = [title, "", head, "-" * len(head)]
    for c in cells:
        row = f"{c.label:<{width}} | {c.connections:>5} | {c.sessions:<8} | "
        if c.failure is not None:
            lines.append(row + f"not measured: {c.failure}")
            continue
        lines.append(
            row + f"{c.rate:>8.0f} | {c.percentile(0.5):>6.1f} | {c.percentile(0.95):>6.1f} | "
            f"{c.percentile(0.99):>6.1f} | {c.errors:>6}"
        )
    return "\n".join(lines)


async def persisted_cells(label: str, database_url: str, args: argparse.Namespace) -> list[Cell]:
    """Persisted turns on one database: each connection count, then shared sessions."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-parlour-"))
    plan: list[tuple[int, int, str]] = [(n, 0, "own") for n in args.connections]
    if args.shared:
        plan.append((max(args.connections), args.shared, f"{args.shared} shared"))
    cells = [Cell(label, n, name) for n, _, name in plan]
    try:
        server = parlour(database_url, data_dir, model="scripted", config=None)
        with serving(server, "/health"):
            url = server.url + "/v1/chat/completions"
            for cell, (_, sessions, _) in zip(cells, plan, strict=True):
                await measure(cell, url, body={}, sessions=sessions, args=args)
    except Exception as exc:
        for cell in cells:
            if not cell.seconds:
                cell.failure = str(exc)[:200]
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return cells


async def persisted(args: argparse.Namespace) -> list[Cell]:
    """The persisted-turns table: SQLite, then PostgreSQL."""
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
        cells = await persisted_cells("parlour, SQLite", f"sqlite+aiosqlite:///{tmp}/p.db", args)
    if args.postgres:
        try:
            async with fresh_postgres() as url:
                cells += await persisted_cells("parlour, PostgreSQL", url, args)
        except (OSError, asyncpg.PostgresError) as exc:
            cells.append(Cell("parlour, PostgreSQL", 0, "-", failure=f"no PostgreSQL: {exc}"))
    return cells


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


def litellm(upstream: Server, workdir: Path) -> Server:
    """LiteLLM proxy routing model `fake` to the fake upstream as an OpenAI-compatible API."""
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
        LITELLM_LOG="ERROR",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        DISABLE_SCHEMA_UPDATE="True",
    )
    argv = [str(LITELLM_ENV / "bin" / "litellm"), "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return Server("litellm", argv, env, port)


async def gateway_rows(
    label: str,
    server: Server | None,
    path: str,
    body: dict[str, Any],
    sessions: int | None,
    args: argparse.Namespace,
) -> list[Cell]:
    """One gateway's cells at each connection count (the server is already up)."""
    cells = [Cell(label, n, "own" if sessions == 0 else "-") for n in args.connections]
    if server is None:
        return cells
    for cell in cells:
        try:
            await measure(cell, server.url + path, body=body, sessions=sessions, args=args)
        except Exception as exc:
            cell.failure = str(exc)[:200]
    return cells


async def upstream(args: argparse.Namespace) -> list[Cell]:
    """The gateway table: the fake upstream alone, parlour's openai backend, LiteLLM proxy."""
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        workdir = Path(tmp)
        fake = fake_upstream()
        with serving(fake, "/stats"):
            chat = "/v1/chat/completions"
            cells += await gateway_rows(
                "fake upstream directly", fake, chat, {"model": "fake"}, None, args
            )
            config = workdir / "parlour.toml"
            config.write_text(
                'default = "up"\n\n[[models]]\nname = "up"\nbackend = "openai"\n'
                f'base_urls = ["{fake.url}/v1"]\nupstream_model = "fake"\n'
                "context_length = 8192\n",
                encoding="utf-8",
            )
            server = parlour(
                f"sqlite+aiosqlite:///{workdir}/p.db", workdir / "data", model="up", config=config
            )
            label = "parlour openai backend, SQLite"
            try:
                with serving(server, "/health"):
                    cells += await gateway_rows(label, server, chat, {}, 0, args)
            except RuntimeError as exc:
                cells += [Cell(label, 0, "-", failure=str(exc)[:200])]
            label = "LiteLLM proxy (stateless)"
            why = litellm_ready() if args.litellm else "skipped (--no-litellm)"
            if why is None:
                proxy = litellm(fake, workdir)
                try:
                    with serving(proxy, "/health/liveliness", timeout=180):
                        cells += await gateway_rows(
                            label, proxy, chat, {"model": "fake"}, None, args
                        )
                except RuntimeError as exc:
                    why = str(exc)[:300]
            if why is not None:
                cells += [Cell(label, 0, "-", failure=why)]
    return cells


async def main() -> None:
    """Run the selected tables and print them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell")
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
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load generator: raw keep-alive HTTP/1.1 on asyncio streams, or httpx",
    )
    parser.add_argument("--no-postgres", dest="postgres", action="store_false")
    parser.add_argument("--no-litellm", dest="litellm", action="store_false")
    parser.add_argument(
        "--only", nargs="+", choices=["persisted", "upstream"], default=["persisted", "upstream"]
    )
    args = parser.parse_args()
    print(f"Machine: {machine()}. The load generator (asyncio + httpx, keep-alive, one process)")
    print("runs on the same cores as the server it measures, so rates are a lower bound.")
    print(
        f"{args.seconds:g} s per cell after {args.warmup:g} s of warm-up; non-streamed requests; "
        f"a session lasts {args.turns_per_session or 'unlimited'} turns.\n",
        flush=True,
    )
    if "persisted" in args.only:
        cells = await persisted(args)
        print(table("Persisted turns, scripted backend (instant)", "turns/s", cells))
        print(flush=True)
    if "upstream" in args.only:
        cells = await upstream(args)
        print(
            table(
                f"In front of the same instant fake upstream ({UPSTREAM_WORDS}-word replies)",
                "req/s",
                cells,
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
