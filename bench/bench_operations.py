"""CPU per persisted turn with metrics and limits off and on, in-process.

Each run is a fresh process that builds the app (scripted backend), drives `--turns`
non-streamed turns through httpx's ASGI transport and reports its own CPU time per turn
(`time.process_time`, the client's share included). Settings alternate; medians printed.

    python bench/bench_operations.py [--runs 5] [--turns 300] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
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


async def one(mode: str, turns: int, url: str | None) -> float:
    """CPU milliseconds per turn of this process in one setting."""
    settings = Settings(
        data_dir=Path(tempfile.mkdtemp()), model="scripted", database_url=url, **MODES[mode]
    )
    app = create_app(settings)
    run = uuid.uuid4().hex[:8]
    body = json.dumps({"messages": [{"role": "user", "content": "hello turn"}]})
    async with app.router.lifespan_context(app):
        await app.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

            async def turn(i: int) -> None:
                headers = {"x-session-key": f"{run}-{i // 50}", "content-type": "application/json"}
                await client.post("/v1/chat/completions", content=body, headers=headers)

            for i in range(60):
                await turn(10**6 + i)
            began = time.process_time()
            for i in range(turns):
                await turn(i)
            return (time.process_time() - began) / turns * 1000


def main() -> None:
    """Alternate the settings in fresh processes and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="pairs of runs per setting")
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--modes", nargs=2, default=["off", "on"], choices=sorted(MODES))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(asyncio.run(one(args.one, args.turns, args.database_url)))
        return
    results: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for index in range(args.runs * 2):
        order = args.modes if index % 2 == 0 else args.modes[::-1]
        for mode in order:
            argv = [sys.executable, __file__, "--one", mode, "--turns", str(args.turns)]
            if args.database_url:
                argv += ["--database-url", args.database_url]
            output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            results[mode].append(float(output.strip().splitlines()[-1]))
    first, second = (statistics.median(results[mode]) for mode in args.modes)
    for mode in args.modes:
        print(f"{mode}: median {statistics.median(results[mode]):.3f} ms CPU per turn")
    print(f"{args.modes[1]} / {args.modes[0]} = {second / first:.3f}")


if __name__ == "__main__":
    main()
