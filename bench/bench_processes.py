"""Persisted turns per second with N server processes (`--workers N`) on one PostgreSQL.

Runs `parlour serve --workers N --model scripted` against a fresh PostgreSQL database for
each N, drives it with concurrent non-streamed turns (each connection its own session),
and prints a table. The scripted backend answers instantly, so this measures the server:
HTTP, the turn's locking, and its database writes.

    python bench/bench_processes.py [--seconds 10] [--connections 16] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

ADMIN_URL = os.environ.get(
    "PARLOUR_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@dataclass
class Result:
    """One configuration's measurements."""

    workers: int
    turns: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        """Completed turns per second."""
        return self.turns / self.seconds

    def percentile(self, q: float) -> float:
        """A latency percentile in milliseconds."""
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def admin(statement: str) -> None:
    """Run one statement on the PostgreSQL server's admin database."""
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def start(workers: int, database: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `parlour serve --workers N` and wait until it is healthy."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
    env["PARLOUR_DATABASE_URL"] = database
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "parlour",
            "serve",
            "--workers",
            str(workers),
            "--model",
            "scripted",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")


async def drive(url: str, connections: int, seconds: float) -> tuple[int, list[float]]:
    """Send turns from `connections` concurrent clients for `seconds`; count completions."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        key = f"bench-{index}-{uuid.uuid4().hex[:6]}"
        turn = 0
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            reply = await client.post(
                f"{url}/v1/chat/completions",
                headers={"x-session-key": key},
                json={"messages": [{"role": "user", "content": f"turn {turn}"}]},
            )
            reply.raise_for_status()
            latencies.append((time.perf_counter() - began) * 1000)
            turn += 1

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(connections)))
    return len(latencies), latencies


async def measure(workers: int, connections: int, seconds: float) -> Result:
    """Run one configuration on a fresh database."""
    name = f"parlour_bench_{uuid.uuid4().hex[:10]}"
    await admin(f'CREATE DATABASE "{name}"')
    database = ADMIN_URL.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
    process, url = start(workers, f"{database}/{name}", Path(tempfile.mkdtemp()))
    try:
        await drive(url, connections, 1.0)  # warm-up: connections, pools, caches
        began = time.perf_counter()
        turns, latencies = await drive(url, connections, seconds)
        elapsed = time.perf_counter() - began
    finally:
        process.terminate()
        process.wait(timeout=30)
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return Result(workers, turns, elapsed, latencies)


async def main() -> None:
    """Measure each worker count and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results = [await measure(n, args.connections, args.seconds) for n in args.workers]
    print(f"\nPersisted turns, scripted backend, PostgreSQL, {args.connections} connections")
    print(f"{'workers':>7} | {'turns/s':>8} | {'p50 ms':>7} | {'p95 ms':>7} | {'mean ms':>7}")
    print("-" * 49)
    for r in results:
        print(
            f"{r.workers:>7} | {r.rate:>8.1f} | {r.percentile(0.5):>7.1f} | "
            f"{r.percentile(0.95):>7.1f} | {statistics.fmean(r.latencies_ms):>7.1f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
