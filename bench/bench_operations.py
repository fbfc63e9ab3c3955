"""CPU per persisted turn with metrics and limits off and on, in one process.

Each run is a fresh process that builds one app per setting (scripted backend, each
with its own database) and drives them in turn: a batch of non-streamed turns through
httpx's ASGI transport (from `--lanes` clients at once) to one app, then a batch to the
next, the order rotating every round, so the settings share the process's state and the
machine's moments, and each follows the others equally often. Each batch's CPU time
(`time.process_time`, the client's share included) counts for its setting. Printed: each
setting's CPU per turn, and the median over rounds of each round's ratio to the first.

    python bench/bench_operations.py [--runs 3] [--rounds 20] [--batch 100] [--lanes 1]
        [--modes off on] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from parlour.app import create_app
from parlour.settings import Settings

MODES: dict[str, dict[str, Any]] = {
    "off": {"metrics": False},
    "metrics": {"metrics": True},
    "on": {
        "metrics": True,
        "requests_per_minute": 10**9,
        "tokens_per_day": 10**12,
        "max_queue": 10**5,
        "max_concurrent_per_owner": 10**5,
    },
}
BODY = json.dumps({"messages": [{"role": "user", "content": "hello turn"}]})

Batch = Callable[[int], Awaitable[None]]


def batcher(client: httpx.AsyncClient, lanes: int) -> Batch:
    """A function that sends `count` turns from `lanes` clients at once, each client
    with its own sessions (a new one every 50 turns)."""
    run = uuid.uuid4().hex[:8]
    sent = [0] * lanes

    async def lane(index: int, count: int) -> None:
        for _ in range(count):
            session = f"{run}-{index}-{sent[index] // 50}"
            sent[index] += 1
            headers = {"x-session-key": session, "content-type": "application/json"}
            response = await client.post("/v1/chat/completions", content=BODY, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

    async def batch(count: int) -> None:
        await asyncio.gather(*(lane(k, count // lanes) for k in range(lanes)))

    return batch


async def one(args: argparse.Namespace) -> dict[str, list[float]]:
    """Per mode, the CPU milliseconds per turn of each round's batch."""
    per_turn: dict[str, list[float]] = {mode: [] for mode in args.modes}
    batches: dict[str, Batch] = {}
    turns = args.batch // args.lanes * args.lanes
    async with contextlib.AsyncExitStack() as stack:
        for mode in args.modes:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            settings = Settings(
                data_dir=data_dir,
                model="scripted",
                database_url=args.database_url,
                **MODES[mode],
            )
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            await app.state.models.wait_loaded()
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://localhost")
            await stack.enter_async_context(client)
            batches[mode] = batcher(client, args.lanes)
            await batches[mode](turns)  # warm-up
        for index in range(args.rounds):
            shift = index % len(args.modes)
            order = args.modes[shift:] + args.modes[:shift]
            for mode in order:
                began = time.process_time()
                await batches[mode](turns)
                per_turn[mode].append((time.process_time() - began) / turns * 1000)
    return per_turn


def main() -> None:
    """Run fresh processes, then print each setting's CPU per turn and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="fresh processes")
    parser.add_argument("--rounds", type=int, default=20, help="batches per setting and run")
    parser.add_argument("--batch", type=int, default=100, help="turns per batch")
    parser.add_argument("--lanes", type=int, default=1, help="clients at once")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--modes", nargs="+", default=["off", "on"], choices=sorted(MODES))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(one(args))))
        return
    results: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for _ in range(args.runs):
        argv = [sys.executable, __file__, "--one", *sys.argv[1:]]
        output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for mode, values in json.loads(output.strip().splitlines()[-1]).items():
            results[mode].extend(values)
    base = args.modes[0]
    for mode in args.modes:
        ratios = [a / b for a, b in zip(results[mode], results[base], strict=True)]
        print(
            f"{mode}: median {statistics.median(results[mode]):.3f} ms CPU per turn; "
            f"/ {base}: median of rounds {statistics.median(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
