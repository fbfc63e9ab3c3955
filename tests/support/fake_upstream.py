"""A small OpenAI-compatible server for tests and benchmarks, controlled by its arguments.

`--mode ok` streams `--words` words with `--delay` seconds between them (0: instant);
`--mode error` answers 500; `--mode hang` never answers. GET /stats reports how many
streams completed and how many the client abandoned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def build(mode: str, words: int, delay: float) -> Starlette:
    """The fake upstream app."""
    stats = {"requests": 0, "completed": 0, "abandoned": 0}

    async def chat(request: Request) -> Response:
        stats["requests"] += 1
        body: dict[str, Any] = await request.json()
        if mode == "error":
            return JSONResponse({"error": {"message": "upstream exploded"}}, status_code=500)
        if mode == "hang":
            await asyncio.sleep(3600)
        limit = min(words, int(body.get("max_tokens") or words))
        prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        created = int(time.time())

        def frame(delta: dict[str, Any], finish: str | None = None) -> str:
            event = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(event)}\n\n"

        if not body.get("stream"):
            text = " ".join(f"w{i}" for i in range(limit))
            stats["completed"] += 1
            return JSONResponse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": body.get("model", "fake"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "length" if limit < words else "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": limit,
                        "total_tokens": prompt + limit,
                    },
                }
            )

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                yield frame({"role": "assistant", "content": ""})
                for i in range(limit):
                    if delay:
                        await asyncio.sleep(delay)
                    yield frame({"content": f" w{i}" if i else f"w{i}"})
                yield frame({}, "length" if limit < words else "stop")
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": limit,
                    "total_tokens": prompt + limit,
                }
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                stats["completed" if finished else "abandoned"] += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def get_stats(request: Request) -> Response:
        return JSONResponse(stats)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/stats", get_stats),
        ]
    )


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["ok", "error", "hang"], default="ok")
    parser.add_argument("--words", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(
        build(args.mode, args.words, args.delay),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
