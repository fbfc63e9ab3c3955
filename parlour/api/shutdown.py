"""Shutting down with streams open: each stream ends in its dialect's way, not mid-body.

uvicorn waits for open connections before the app's lifespan shutdown runs, so a stream
left alone would run on until the grace period ends and then be cut. Instead, when the
server begins to shut down, the app's `stopping` event is set: every open event stream
stops relaying its generation, sends its dialect's error event and end marker, and
closes (which cancels its generation; the partial reply is kept as `cancelled`); every
other running generation is cancelled too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI

from ..errors import ParlourError, ServerShuttingDown

#: Renders the shutdown error as the events that end a stream in one dialect.
Closing = Callable[[ParlourError], Sequence[str]]

SHUTDOWN_MESSAGE = "The server is shutting down; the reply stopped here. Try again shortly."


def install_shutdown(app: FastAPI) -> None:
    """Give the app the event that says it is shutting down."""
    app.state.stopping = asyncio.Event()


def begin_shutdown(app: Any) -> None:
    """End open streams in their dialects' way and cancel every running generation."""
    stopping: asyncio.Event | None = getattr(app.state, "stopping", None)
    if stopping is not None:
        stopping.set()
    engine = getattr(app.state, "engine", None)
    for generation in list(engine.running if engine is not None else ()):
        generation.cancel()


async def _next(iterator: AsyncIterator[str]) -> str:
    return await anext(iterator)


async def until_stopped(
    body: AsyncIterator[str], stopping: asyncio.Event, closing: Closing
) -> AsyncIterator[str]:
    """`body`'s events until `stopping` is set, then `closing`'s events instead of the rest."""
    stopped = asyncio.ensure_future(stopping.wait())
    step: asyncio.Future[str] | None = None
    try:
        while True:
            step = asyncio.ensure_future(_next(body))
            await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.is_set():
                break
            try:
                yield step.result()
            except StopAsyncIteration:
                return
        await _stop(step)
        for item in closing(ServerShuttingDown(SHUTDOWN_MESSAGE)):
            yield item
    finally:
        # Also reached when the client goes away: the body's own cleanup (which cancels
        # its generation) must run, wherever the body was.
        stopped.cancel()
        await _stop(step)
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()


async def _stop(step: asyncio.Future[str] | None) -> None:
    if step is not None and not step.done():
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the app when shutdown begins, and exiting 0 on SIGTERM."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: Any = None) -> None:
        """Stop generations and end open streams, then shut down as uvicorn does."""
        begin_shutdown(self.app)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's signal handling, without re-raising SIGTERM once shut down cleanly."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def serve(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    """Serve `app` in this process until SIGINT or SIGTERM."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # parlour's own logging (parlour.ops.logs) writes the access log and the format.
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    GracefulServer(config, app).run()
