"""Each process's share of the shared limit counters: request slots taken in blocks (never
more than the limit across processes, one statement per block), and token counts written
in batches and read again when stale. Two RequestSlots / TokenCounts on one storage stand
for two processes; the storage is memory on SQLite runs and the database on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from limits.aio.storage import MemoryStorage, Storage

from parlour.ops import counters
from parlour.ops.counters import RequestSlots, TokenCounts, block
from parlour.ops.ratelimit_storage import DatabaseStorage
from parlour.store.db import Database

MINUTE = 60


@pytest.fixture
async def storage(database_url: str | None) -> AsyncIterator[Storage]:
    """The storage the test's processes share: memory, or a migrated PostgreSQL database."""
    if database_url is None:
        yield MemoryStorage()
        return
    db = Database(database_url)
    await db.migrate()
    await db.close()
    shared = DatabaseStorage(database_url)
    try:
        yield shared
    finally:
        await shared.close()


def counting(storage: Storage) -> list[str]:
    """Record each counter statement the storage runs (its name)."""
    calls: list[str] = []
    for name in ("incr", "incr_window", "get"):
        method = getattr(storage, name, None)
        if method is None:
            continue

        async def call(
            *args: Any, _method: Callable[..., Any] = method, _name: str = name, **kwargs: Any
        ) -> Any:
            calls.append(_name)
            return await _method(*args, **kwargs)

        setattr(storage, name, call)
    return calls


@pytest.mark.parametrize(("limit", "size"), [(1, 1), (3, 1), (60, 1), (100, 2), (10**9, 100)])
def test_blocks_are_one_slot_for_small_limits_and_bounded_for_large(limit: int, size: int) -> None:
    assert block(limit) == size


async def test_a_block_costs_one_statement(storage: Storage) -> None:
    calls = counting(storage)
    slots = RequestSlots(storage)
    taken = [(await slots.take("busy", 10**9, MINUTE))[1] for _ in range(1000)]
    assert all(taken)
    assert len([c for c in calls if c in ("incr", "incr_window")]) == 1000 // block(10**9)
    window = (await slots.take("busy", 10**9, MINUTE))[0]
    assert window.used == 1001  # one process: every slot handed out is accounted for


async def test_two_processes_never_exceed_the_limit_together(storage: Storage) -> None:
    limit = 500  # blocks of 10
    first, second = RequestSlots(storage), RequestSlots(storage)
    granted = {id(first): 0, id(second): 0}
    for _ in range(limit):
        for slots in (first, second):
            if (await slots.take("shared", limit, MINUTE))[1]:
                granted[id(slots)] += 1
    total = sum(granted.values())
    # Never over; short of it by at most what one process holds unused (a block each).
    assert limit - 2 * block(limit) <= total <= limit
    assert min(granted.values()) >= limit // 2 - block(limit)


async def test_exact_for_small_limits_across_processes(storage: Storage) -> None:
    first, second = RequestSlots(storage), RequestSlots(storage)
    taken = [
        (await (first if i % 2 == 0 else second).take("small", 3, MINUTE))[1] for i in range(6)
    ]
    assert taken == [True, True, True, False, False, False]


async def test_concurrent_requests_share_the_blocks_they_take(storage: Storage) -> None:
    slots = RequestSlots(storage)
    results = await asyncio.gather(*(slots.take("burst", 10, MINUTE) for _ in range(40)))
    assert [taken for _, taken in results].count(True) == 10


async def test_slots_of_blocks_taken_at_once_all_count(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Forty requests find no slot and ask the storage at the same time (the storage
    # yields first, as a database does); every block granted must be kept.
    for name in ("incr", "incr_window"):
        method = getattr(storage, name, None)
        if method is None:
            continue

        async def yielding(*args: Any, _method: Callable[..., Any] = method, **kw: Any) -> Any:
            await asyncio.sleep(0)
            return await _method(*args, **kw)

        monkeypatch.setattr(storage, name, yielding)
    slots = RequestSlots(storage)
    results = await asyncio.gather(*(slots.take("blocks", 500, MINUTE) for _ in range(40)))
    assert all(taken for _, taken in results)
    window = results[-1][0]
    assert window.seen == 40 * block(500)  # every one took a block ...
    assert window.used == 40  # ... and the slots left of them stay this process's
    assert window.left == 40 * block(500) - 40


async def test_a_full_window_refuses_without_asking_the_storage(storage: Storage) -> None:
    slots = RequestSlots(storage)
    for _ in range(2):
        await slots.take("full", 2, MINUTE)
    calls = counting(storage)
    refused = [(await slots.take("full", 2, MINUTE))[1] for _ in range(5)]
    assert refused == [False] * 5
    assert calls == []  # the last statement said every slot was handed out


async def test_reading_a_window_uses_no_slot(storage: Storage) -> None:
    slots, other = RequestSlots(storage), RequestSlots(storage)
    await slots.take("read", 3, MINUTE)
    window = await other.peek("read")
    assert window.used == 1 and window.left == 0
    assert (await slots.take("read", 3, MINUTE))[0].used == 2


async def test_tokens_spent_in_one_process_reach_the_other(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(counters, "FLUSH_S", 0.01)
    first, second = TokenCounts(storage), TokenCounts(storage)
    assert await second.used("day") == 0
    first.spend("day", 30, 3600)
    assert await first.used("day") == 30  # at once in the process that counted them
    await asyncio.sleep(0.1)
    assert await second.used("day") == 0  # the other's reading is still fresh
    monkeypatch.setattr(counters, "FRESH_S", 0.0)
    assert await second.used("day") == 30
    await first.close()
    await second.close()


async def test_tokens_counted_while_a_flush_writes_are_written_next(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(counters, "FLUSH_S", 0.01)
    gate = asyncio.Event()
    incr = storage.incr

    async def slow_incr(key: str, expiry: int, amount: int = 1) -> int:
        await gate.wait()
        return await incr(key, expiry, amount=amount)

    monkeypatch.setattr(storage, "incr", slow_incr)
    tokens = TokenCounts(storage)
    tokens.spend("day", 5, 3600)
    await asyncio.sleep(0.05)  # the flush is waiting on the storage
    tokens.spend("day", 7, 3600)
    assert await tokens.used("day") == 12  # written or not, this process counts both
    gate.set()
    for _ in range(200):
        if await storage.get("day") == 12:
            break
        await asyncio.sleep(0.01)
    assert await storage.get("day") == 12
    assert await tokens.used("day") == 12
    await tokens.close()
