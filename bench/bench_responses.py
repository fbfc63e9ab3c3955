"""Responses API chains against x-session-key sessions on the embedded model, in one run.

Starts one `parlour serve` (embedded SmolLM2, temp data directory) and runs N conversations
interleaved round-robin for T turns through both doors, alternating which goes first:

- sessions: /v1/chat/completions with `x-session-key`, only each turn's new message;
- responses: /v1/responses with `previous_response_id`, only each turn's new input (the
  system prompt as the first input item, since `instructions` are not inherited).

Both stream at temperature 0. The table is TTFT per turn (mean over the conversations) and
the cached prompt tokens the Responses API reports; the target is the same flat TTFT as
sessions (turn T <= 1.5x turn 1).

    python -m bench.bench_responses [--repeats 3] [--conversations 4] [--turns 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.bench_sessions import (
    Conversation,
    Parlour,
    Reply,
    Setup,
    Summary,
    Target,
    load,
    parlour_server,
    run_interleaved,
    single,
)


class Responses(Target):
    """parlour's Responses API: each turn continues the conversation's newest response."""

    name = "responses"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.last: dict[str, str] = {}
        #: Each turn's cached prompt tokens as the server reported them, in order.
        self.cached: list[tuple[int, int]] = []

    async def turn(
        self,
        client: httpx.AsyncClient,
        conversation: Conversation,
        user: str,
        max_tokens: int,
    ) -> Reply:
        items: list[dict[str, str]] = []
        previous = self.last.get(conversation.key)
        if previous is None:
            items.append({"role": "system", "content": conversation.system})
        items.append({"role": "user", "content": user})
        body: dict[str, Any] = {
            "input": items,
            "max_output_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        if previous is not None:
            body["previous_response_id"] = previous
        reply = await stream_response(client, self.url, body, self.cached)
        conversation.history.append({"role": "user", "content": user})
        if reply.error is None and reply.response_id:
            self.last[conversation.key] = reply.response_id
        return reply


@dataclass
class ResponseReply(Reply):
    """A streamed response: its id besides what every reply records."""

    response_id: str | None = None


async def stream_response(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], cached: list[tuple[int, int]]
) -> ResponseReply:
    """POST a streaming response and record when each delta arrived."""
    reply = ResponseReply(started=time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/v1/responses", json=body) as response:
            if response.status_code != 200:
                reply.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return reply
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    record(reply, json.loads(line[5:]), cached)
    except httpx.HTTPError as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    finally:
        reply.ended = time.perf_counter()
    return reply


def record(reply: ResponseReply, event: dict[str, Any], cached: list[tuple[int, int]]) -> None:
    """Fold one event into the reply."""
    kind = event["type"]
    if kind == "response.created":
        reply.response_id = event["response"]["id"]
    elif kind == "response.output_text.delta":
        now = time.perf_counter()
        reply.first = reply.first if reply.first is not None else now
        reply.last = now
        reply.text += event["delta"]
        reply.chunks += 1
    elif kind in ("response.completed", "response.incomplete", "response.failed"):
        usage = event["response"].get("usage") or {}
        reply.usage_tokens = usage.get("output_tokens")
        reply.prompt_tokens = usage.get("input_tokens")
        details = usage.get("input_tokens_details") or {}
        cached.append((usage.get("input_tokens", 0), details.get("cached_tokens", 0)))
        status = event["response"]["status"]
        reply.finish_reason = {"completed": "stop", "incomplete": "length"}.get(status, status)
        if event["response"].get("error"):
            reply.error = str(event["response"]["error"])


async def main() -> None:
    """Start parlour, run both modes interleaved, print the tables."""
    from parlour.backends.llama import default_threads

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--model", help="a .gguf to serve [parlour's embedded default]")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=48)
    args = parser.parse_args()
    setup = Setup.plan(args.model, args.threads)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
    )
    print(f"load average at start: {load()}")
    summary: Summary = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-responses-") as temp,
        parlour_server(setup, Path(temp)) as url,
    ):
        print(setup.describe())
        sessions, responses = Parlour(url), Responses(url)
        targets: list[Target] = [sessions, responses]
        for target in targets:  # warm-up
            await single(target, 8)
        responses.cached.clear()
        await run_interleaved(
            targets, args.repeats, args.turn_tokens, args.conversations, args.turns, summary
        )
    # run_interleaved goes turn by turn over the conversations
    later = [c for i, c in enumerate(responses.cached) if (i // args.conversations) % args.turns]
    share = statistics.fmean(c / p for p, c in later if p) if later else 0.0
    print(f"\nresponses after turn 1: cached_tokens {100 * share:.0f}% of input_tokens on average")
    for name in (sessions.name, responses.name):
        ratio = summary.get(name, {}).get("ttft ratio", 0.0)
        verdict = "met" if ratio <= 1.5 else "MISSED"
        print(f"- {name}: TTFT turn {args.turns} / turn 1 <= 1.5x: {ratio:.2f}x -> {verdict}")
    print(f"\nload average at end: {load()}")


if __name__ == "__main__":
    asyncio.run(main())
