"""Memory over time under steady load: does a server's RSS level off?

Starts `parlour serve` (the embedded model by default, or `--model scripted`) on a fresh
data directory, drives it with N clients that each hold a conversation of their own
(OpenAI dialect, one session key per client, a new session every `--turns-per-session`
turns), and prints the server's RSS every `--interval` seconds, then a summary.

    python bench/soak.py --minutes 20 --clients 8
    python bench/soak.py --minutes 2 --clients 8 --model scripted
    python bench/soak.py --minutes 5 --config soak.toml   # e.g. state_ram_mb = 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = (
    "Tell me one fact about the moon.",
    "And why does that matter?",
    "Say it again in one short sentence.",
    "Name a related fact.",
)


@dataclass
class Load:
    """Turns completed and failed, shared by the clients."""

    turns: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(model: str, data_dir: Path, config: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server and wait until it answers /health (the model loaded)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}
    command = [sys.executable, "-m", "parlour", "serve", "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--log-level", "warning"]
    if model:
        command += ["--model", model]
    if config:
        command += ["--config", config]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("server did not become healthy")


async def client(
    url: str, index: int, load: Load, stop_at: float, *, max_tokens: int, per_session: int
) -> None:
    """One user: turns on its own session until the time is up."""
    turn = 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        while time.monotonic() < stop_at:
            key = f"soak:{index}:{turn // per_session}"
            body = {
                "messages": [{"role": "user", "content": PROMPTS[turn % len(PROMPTS)]}],
                "max_tokens": max_tokens,
            }
            response = await http.post(
                "/v1/chat/completions", json=body, headers={"x-session-key": key}
            )
            load.statuses[response.status_code] = load.statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                load.turns += 1
            else:
                load.errors += 1
            turn += 1


async def sample(pid: int, load: Load, stop_at: float, interval: float) -> list[float]:
    """Print RSS every `interval` seconds; return the samples."""
    began = time.monotonic()
    samples: list[float] = []
    print(f"{'elapsed s':>9}  {'RSS MiB':>8}  {'turns':>6}  {'errors':>6}", flush=True)
    while True:
        now = time.monotonic()
        samples.append(rss_mb(pid))
        print(
            f"{now - began:9.0f}  {samples[-1]:8.1f}  {load.turns:6d}  {load.errors:6d}",
            flush=True,
        )
        if now >= stop_at:
            return samples
        await asyncio.sleep(min(interval, max(0.0, stop_at - now)))


async def soak(args: argparse.Namespace, pid: int, url: str) -> None:
    """Run the clients and the sampler; print the summary."""
    load = Load()
    stop_at = time.monotonic() + args.minutes * 60
    print(f"server pid {pid}, RSS at start {rss_mb(pid):.1f} MiB", flush=True)
    clients = [
        client(
            url,
            i,
            load,
            stop_at,
            max_tokens=args.max_tokens,
            per_session=args.turns_per_session,
        )
        for i in range(args.clients)
    ]
    sampler = asyncio.create_task(sample(pid, load, stop_at, args.interval))
    await asyncio.gather(*clients)
    samples = await sampler
    tail = samples[len(samples) // 2 :]
    print(
        f"\n{args.minutes:g} min, {args.clients} clients: {load.turns} turns, {load.errors} "
        f"errors {load.statuses}; RSS start {samples[0]:.1f}, peak {max(samples):.1f}, "
        f"end {samples[-1]:.1f} MiB; second half min {min(tail):.1f} max {max(tail):.1f} MiB"
    )


def main() -> None:
    """Parse arguments, start the server, soak it, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--turns-per-session", type=int, default=12)
    parser.add_argument("--model", default="", help="e.g. scripted; default: the embedded one")
    parser.add_argument("--config", default="", help="a models TOML (e.g. a smaller state_ram_mb)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parlour-soak-") as tmp:
        process, url = start(args.model, Path(tmp) / "data", args.config)
        try:
            asyncio.run(soak(args, process.pid, url))
        finally:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
