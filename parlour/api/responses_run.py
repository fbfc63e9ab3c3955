"""Running a response: start the engine's turn, turn its deltas into Responses-API events, and
keep them in the store's event log, which every stream (live or resumed) reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from ..errors import ParlourError
from ..store import responses as store
from ..store.db import Database
from ..store.notify import EventHub
from ..store.tables import StoredResponse, utcnow
from ..turns.engine import Engine
from ..turns.request import TurnRequest, TurnResult
from ..turns.stream import Turn
from .responses_protocol import TERMINAL_EVENTS, output_item, response_object

log = logging.getLogger(__name__)

#: Seconds a follower waits for a wake-up before looking at the log again anyway.
POLL_SECONDS = 2.0
STATUS = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled", "error": "failed"}


@dataclass(frozen=True)
class Draft:
    """A response's stored row and the turn it runs, settled by the edge before it runs."""

    row: StoredResponse
    request: TurnRequest


def finish(row: StoredResponse, result: TurnResult) -> None:
    """Record how the generation ended on the response."""
    row.model = result.model
    row.status = STATUS[result.finish_reason]
    row.incomplete_reason = "max_output_tokens" if result.finish_reason == "length" else None
    if result.finish_reason == "error":
        row.error = {"code": "server_error", "message": "Generation failed."}
    row.input_tokens = result.prompt_tokens
    row.output_tokens = result.completion_tokens
    row.cached_tokens = result.cached_tokens
    row.completed_at = utcnow()


class Numbered:
    """Numbers one response's events from 0."""

    def __init__(self) -> None:
        self.sequence = -1

    def __call__(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence, **fields}


async def produce(row: StoredResponse, stream: Turn) -> AsyncIterator[dict[str, Any]]:
    """The events of a running response, ending with its terminal event; updates `row`."""
    event = Numbered()
    where = {"item_id": row.output_id, "output_index": 0, "content_index": 0}
    empty = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.created", response=response_object(row))
    yield event("response.in_progress", response=response_object(row))
    yield event("response.output_item.added", output_index=0, item=output_item(row, done=False))
    yield event("response.content_part.added", **where, part=empty)
    try:
        async for delta in stream:
            row.output_text += delta
            yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
        finish(row, await stream.result())
    except ParlourError as exc:
        row.status, row.completed_at = "failed", utcnow()
        row.error = {"code": exc.code, "message": exc.message}
        yield event("response.failed", response=response_object(row))
        return
    text = row.output_text
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part={**empty, "text": text})
    yield event("response.output_item.done", output_index=0, item=output_item(row, done=True))
    kind = "response.completed" if row.status == "completed" else "response.incomplete"
    if row.status == "failed":
        kind = "response.failed"
    yield event(kind, response=response_object(row))


class ResponseRunner:
    """Runs stored responses in tasks of their own, so they go on without the client."""

    def __init__(self, *, engine: Engine, db: Database, hub: EventHub) -> None:
        self.engine = engine
        self.db = db
        self.hub = hub
        self._running: dict[str, Turn] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: The events of the responses running here, so their followers here need not wait
        #: for the database (index = sequence number).
        self._logs: dict[str, list[dict[str, Any]]] = {}
        hub.on_cancel = self.cancel_here

    async def begin(self, draft: Draft) -> Turn:
        """Start the generation and wait until it may begin (raising the request's error)."""
        stream = self.engine.start(draft.request)
        try:
            await stream.started()
        except BaseException:
            stream.cancel()
            raise
        draft.row.model = stream.model or draft.row.model
        return stream

    async def run(self, row: StoredResponse, stream: Turn) -> asyncio.Task[None]:
        """Store the response and pump its events into the log in a task of its own."""
        async with self.db.session() as session, session.begin():
            session.add(row)
        self._running[row.id] = stream
        self._logs[row.id] = []
        task = asyncio.create_task(self._pump(row, stream))
        self._tasks[row.id] = task
        task.add_done_callback(lambda _t: self._forget(row.id))
        return task

    def _forget(self, response_id: str) -> None:
        self._running.pop(response_id, None)
        self._tasks.pop(response_id, None)
        self._logs.pop(response_id, None)

    def cancel_here(self, response_id: str) -> None:
        """Stop a response if this process runs it (its partial text is kept)."""
        stream = self._running.get(response_id)
        if stream is not None:
            stream.cancel()

    async def _pump(self, row: StoredResponse, stream: Turn) -> None:
        pending: list[dict[str, Any]] = []
        ready = asyncio.Event()
        events = self._logs[row.id]

        async def collect() -> None:
            try:
                async for item in produce(row, stream):
                    pending.append(item)
                    ready.set()
                    # The final event waits for the store: whoever sees it may at once
                    # retrieve or continue the response, in any process.
                    if item["type"] not in TERMINAL_EVENTS:
                        events.append(item)
                        self.hub.wake_here(row.id)
            finally:
                ready.set()

        collector = asyncio.create_task(collect())
        try:
            while not (collector.done() and not pending):
                await ready.wait()
                ready.clear()
                batch, pending[:] = list(pending), []
                if batch and await self._flush(row, batch):
                    stream.cancel()
                final = [e for e in batch if e["type"] in TERMINAL_EVENTS]
                if final:
                    events.extend(final)
                    self.hub.wake_here(row.id)
        except Exception:
            log.exception("writing the events of %s failed", row.id)
            stream.cancel()
        finally:
            await asyncio.gather(collector, return_exceptions=True)

    async def _flush(self, row: StoredResponse, batch: list[dict[str, Any]]) -> bool:
        """Log a batch of events and the response's state; True if a cancel was asked for
        (read back too, in case the notification did not reach this process)."""
        async with self.db.session() as session, session.begin():
            await store.append_events(session, row.id, batch)
            await store.save_progress(session, row)
            cancel = await session.scalar(
                select(StoredResponse.cancel_requested).where(StoredResponse.id == row.id)
            )
        await self.hub.publish(row.id)
        return bool(cancel)

    async def follow(self, response_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
        """The logged events after `after`, then new ones as they are written, to the end."""
        log = self._logs.get(response_id)
        source = self._follow_here(response_id, log, after) if log is not None else None
        if source is None:
            source = self._follow_logged(response_id, after)
        async for item in source:
            yield item

    async def _follow_here(
        self, response_id: str, log: list[dict[str, Any]], after: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Follow a response that runs in this process from its events in memory."""
        while True:
            with self.hub.waiter(response_id) as woken:
                new = log[after + 1 :]
                for item in new:
                    yield item
                    after = item["sequence_number"]
                    if item["type"] in TERMINAL_EVENTS:
                        return
                if not new:
                    if response_id not in self._logs:
                        return  # ended without a final event: nothing more will come
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woken.wait(), POLL_SECONDS)

    async def _follow_logged(self, response_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
        """Follow a response from the database's event log, wherever it runs."""
        ended = False
        while True:
            with self.hub.waiter(response_id) as woken:
                async with self.db.read() as session, session.begin():
                    events = await store.events_after(session, response_id, after)
                for item in events:
                    yield item
                    after = item["sequence_number"]
                    if item["type"] in TERMINAL_EVENTS:
                        return
                if events:
                    continue
                if ended:  # read once more after it ended: nothing was left
                    return
                try:
                    await asyncio.wait_for(woken.wait(), POLL_SECONDS)
                except TimeoutError:
                    ended = not await self._still_running(response_id)

    async def _still_running(self, response_id: str) -> bool:
        """Whether a response may still log events (neither deleted nor finished)."""
        async with self.db.read() as session, session.begin():
            row = await session.get(StoredResponse, response_id)
        return row is not None and not row.deleted and row.status == "in_progress"

    async def close(self) -> None:
        """Stop running responses (their partial text is written) and wait for them."""
        for stream in list(self._running.values()):
            stream.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
