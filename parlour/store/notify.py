"""Wake-ups for readers of response event logs: in process always, across processes on PostgreSQL.

A reader registers a waiter, reads the log, and sleeps until a writer publishes for that
response. On PostgreSQL every publish is also a NOTIFY on one channel, which each process
LISTENs to with a connection of its own, so a reader in another process wakes too; the
same channel carries cancel requests to the process that runs the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "parlour_responses"


class EventHub:
    """Per-response wake-ups and cancel requests, shared by every process on PostgreSQL."""

    def __init__(self, url: str, *, is_sqlite: bool) -> None:
        self._url = None if is_sqlite else url
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._connection: Any = None
        self._lock = asyncio.Lock()
        #: Called with a response id when some process asks to cancel it.
        self.on_cancel: Callable[[str], None] = lambda _id: None

    async def start(self) -> None:
        """On PostgreSQL, open the listening connection."""
        if self._url is None:
            return
        import asyncpg

        plain = make_url(self._url).set(drivername="postgresql")
        self._connection = await asyncpg.connect(plain.render_as_string(hide_password=False))
        await self._connection.add_listener(CHANNEL, self._notified)

    async def close(self) -> None:
        """Close the listening connection."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    @contextlib.contextmanager
    def waiter(self, response_id: str) -> Iterator[asyncio.Event]:
        """An event set on the next publish for this response (register before reading)."""
        woken = asyncio.Event()
        self._waiters.setdefault(response_id, set()).add(woken)
        try:
            yield woken
        finally:
            waiting = self._waiters.get(response_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiters[response_id]

    async def publish(self, response_id: str) -> None:
        """Wake every reader of this response, here and in other processes."""
        self.wake_here(response_id)
        await self._notify(f"e:{response_id}")

    async def request_cancel(self, response_id: str) -> None:
        """Ask whichever process runs this response to stop it."""
        self.on_cancel(response_id)
        await self._notify(f"c:{response_id}")

    async def _notify(self, payload: str) -> None:
        if self._connection is None:
            return
        try:
            async with self._lock:
                await self._connection.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
        except Exception:  # a lost connection must not fail the response; readers also poll
            log.warning("could not notify other processes", exc_info=True)

    def wake_here(self, response_id: str) -> None:
        """Wake this process's readers of a response only."""
        for woken in self._waiters.get(response_id, ()):
            woken.set()

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        kind, _, response_id = payload.partition(":")
        if kind == "e":
            self.wake_here(response_id)
        elif kind == "c":
            self.on_cancel(response_id)
