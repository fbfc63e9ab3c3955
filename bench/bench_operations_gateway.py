"""Gateway cost of metrics and limits: `parlour serve` with them off against on.

Two servers run side by side for each connection count, each with its own database
(a SQLite file, or a fresh PostgreSQL database): one with `PARLOUR_METRICS=0` and no
limits, one with metrics on and every limit set high enough never to refuse (requests per
minute, tokens per day, queue bounds), so every turn is counted in every metric, checked
against both limits and admission, and its tokens counted. The load generator of
bench_gateway.py (persisted, non-streamed `POST /v1/chat/completions`, a session per
connection lasting 50 turns) drives them in alternating bursts of `--seconds`, the order
flipping every round, so both servers live through the same moments of a shared machine.
Each burst's server CPU time (from /proc) counts for its server. Printed: the table of
both servers' totals, and per connection count the median over rounds of each round's
ratio of CPU per turn, on / off.

    python -m bench.bench_operations_gateway [--seconds 3] [--rounds 8] [--connections 1 16]
        [--databases sqlite postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from bench.bench_gateway import (
    CHAT,
    Cell,
    Load,
    Server,
    drive,
    fresh_postgres,
    machine,
    parlour,
    serving,
    table,
)

#: Metrics and every limit off, and on (too high to refuse anything).
OPERATIONS = {
    "off": {"PARLOUR_METRICS": "0"},
    "on": {
        "PARLOUR_METRICS": "1",
        "PARLOUR_REQUESTS_PER_MINUTE": "1000000000",
        "PARLOUR_TOKENS_PER_DAY": "1000000000000",
        "PARLOUR_MAX_QUEUE": "100000",
        "PARLOUR_MAX_CONCURRENT_PER_OWNER": "100000",
    },
}


@contextlib.asynccontextmanager
async def databases(kind: str) -> AsyncIterator[dict[str, str]]:
    """A database URL per setting: SQLite files, or fresh PostgreSQL databases."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
            yield {mode: f"sqlite+aiosqlite:///{tmp}/{mode}.db" for mode in OPERATIONS}
        return
    async with fresh_postgres() as off, fresh_postgres() as on:
        yield {"off": off, "on": on}


async def burst(server: Server, load: Load, cell: Cell, seconds: float) -> float:
    """Drive one server for `seconds`, adding to its cell; its CPU ms per turn in it."""
    done, cpu, began = len(cell.latencies_ms), server.cpu(), time.perf_counter()
    await drive(server.url + CHAT, load, seconds, cell)
    used = server.cpu() - cpu
    cell.seconds += time.perf_counter() - began
    cell.cpu_seconds += used
    return 1000 * used / max(1, len(cell.latencies_ms) - done)


async def side_by_side(
    label: str, urls: dict[str, str], connections: int, args: argparse.Namespace
) -> tuple[list[Cell], list[float]]:
    """Both servers' cells for one connection count, and each round's on/off ratio."""
    cells = {mode: Cell(f"{label}, metrics+limits {mode}", connections, "own") for mode in urls}
    load = Load(connections, {}, 0, 50, "raw")
    ratios: list[float] = []
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        for mode, url in urls.items():
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
            settings = OPERATIONS[mode]
            server = parlour(url, data_dir, model="scripted", config=None, settings=settings)
            servers[mode] = stack.enter_context(serving(server, "/health"))
        for server in servers.values():
            await drive(server.url + CHAT, load, args.warmup)
        for index in range(args.rounds):
            order = ["off", "on"] if index % 2 == 0 else ["on", "off"]
            per_turn = {}
            for mode in order:
                per_turn[mode] = await burst(servers[mode], load, cells[mode], args.seconds)
            ratios.append(per_turn["on"] / per_turn["off"])
            print(
                f"  {label}, {connections} conn, round {index + 1}: "
                f"on {per_turn['on']:.2f} / off {per_turn['off']:.2f} ms CPU per turn",
                file=sys.stderr,
                flush=True,
            )
    return [cells["off"], cells["on"]], ratios


async def main(args: argparse.Namespace) -> None:
    """Measure each database and connection count, then print the table and ratios."""
    print(f"Machine: {machine()}.")
    cells: list[Cell] = []
    lines = ["", "on / off, CPU per turn (median of the rounds' ratios; min-max):"]
    for kind in args.databases:
        label = "parlour, SQLite" if kind == "sqlite" else "parlour, PostgreSQL"
        try:
            async with databases(kind) as urls:
                for n in args.connections:
                    pair, ratios = await side_by_side(label, urls, n, args)
                    cells += pair
                    lines.append(
                        f"  {label}, {n} conn: {statistics.median(ratios):.3f} "
                        f"({min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} rounds)"
                    )
        except (OSError, asyncpg.PostgresError) as exc:
            cells.append(Cell(label, 0, "-", failure=f"no database: {exc}"))
    title = "Persisted turns, scripted backend: metrics and limits off and on, side by side"
    print(table(title, "turns/s", cells) + "\n".join(lines))
    print(f"\nAfterwards: {machine()}.")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per burst")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--rounds", type=int, default=8, help="off/on bursts per row")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--databases", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"]
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
