"""Per-session prompt state and concurrent streams in the embedded backend (real model)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from parlour.backends.base import ChatMessage, GenerationParams
from parlour.backends.llama import LlamaBackend
from parlour.backends.state_store import StateStore
from parlour.models import embedded_gguf

pytestmark = pytest.mark.model

SYSTEM = ChatMessage("system", "You are a helpful assistant who answers in one short paragraph.")
TURN1 = ChatMessage("user", "Name three animals that live in the sea.")
TURN2 = ChatMessage("user", "Which of them is the largest?")


@asynccontextmanager
async def backend(tmp_path: Path, **options: int) -> AsyncIterator[LlamaBackend]:
    """A loaded embedded backend with a small state budget to exercise eviction."""
    llama = LlamaBackend(
        path=embedded_gguf(),
        context_length=2048,
        state_dir=tmp_path / "state",
        **options,  # type: ignore[arg-type]
    )
    await llama.load()
    try:
        yield llama
    finally:
        await llama.close()


async def reply(
    llama: LlamaBackend,
    messages: list[ChatMessage],
    session: str | None,
    *,
    seed: int = 7,
    max_tokens: int = 24,
    temperature: float = 0.8,
) -> str:
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return "".join([c.text async for c in llama.stream(messages, params, session=session)])


async def other_sessions(llama: LlamaBackend, count: int) -> None:
    for i in range(count):
        await reply(
            llama, [ChatMessage("user", f"Say the number {i}.")], f"other-{i}", max_tokens=4
        )


async def second_turn(llama: LlamaBackend, session: str, first: str) -> str:
    # Greedy: a cached prefix was evaluated in other batches (its reply one token at a
    # time), so logits can differ from a fresh evaluation in their last bits; sampling
    # at temperature > 0 can turn that into another token, argmax does not.
    return await reply(
        llama,
        [SYSTEM, TURN1, ChatMessage("assistant", first), TURN2],
        session,
        seed=11,
        temperature=0.0,
        max_tokens=32,
    )


async def test_same_seed_same_reply_from_ram_disk_and_nothing(tmp_path: Path) -> None:
    async with backend(tmp_path / "a", slots=2) as fresh:
        first = await reply(fresh, [SYSTEM, TURN1], None, seed=3)
        from_nothing = await second_turn(fresh, "never-seen", first)
        assert fresh.stats.restored_from_ram == fresh.stats.restored_from_disk == 0

    async with backend(tmp_path / "b", slots=2) as ram:
        assert await reply(ram, [SYSTEM, TURN1], "s", seed=3) == first
        await other_sessions(ram, 3)  # more sessions than slots: "s" is saved to RAM
        assert ram.store is not None and "s" in ram.store
        from_ram = await second_turn(ram, "s", first)
        assert ram.stats.restored_from_ram == 1

    async with backend(tmp_path / "c", slots=2, ram_budget=0) as disk:
        assert await reply(disk, [SYSTEM, TURN1], "s", seed=3) == first
        await other_sessions(disk, 3)  # no RAM budget: "s" goes straight to disk
        assert disk.store is not None and disk.store.disk_used > 0
        from_disk = await second_turn(disk, "s", first)
        assert disk.stats.restored_from_disk == 1

    assert from_nothing.strip()
    assert from_ram == from_nothing
    assert from_disk == from_nothing


async def test_follow_up_evaluates_only_new_tokens(tmp_path: Path) -> None:
    async with backend(tmp_path, slots=2) as llama:
        first = await reply(llama, [SYSTEM, TURN1], "s")
        history = [SYSTEM, TURN1, ChatMessage("assistant", first), TURN2]
        full = llama.prompt_tokens(history)
        shared = llama.prompt_tokens([SYSTEM, TURN1])

        # Directly after turn 1.
        before = llama.stats.prompt_tokens_evaluated
        await reply(llama, history, "s")
        evaluated = llama.stats.prompt_tokens_evaluated - before
        # Only what turn 1 did not already evaluate: the reply's closing and turn 2.
        assert evaluated <= full - shared
        assert evaluated < full / 2

        # And after other sessions pushed this one out of its slot and back.
        second = [*history, ChatMessage("assistant", "The whale."), ChatMessage("user", "Why?")]
        await other_sessions(llama, 4)
        before = llama.stats.prompt_tokens_evaluated
        reused_before = llama.stats.prompt_tokens_reused
        await reply(llama, second, "s")
        evaluated = llama.stats.prompt_tokens_evaluated - before
        assert llama.stats.restored_from_ram >= 1
        assert evaluated < llama.prompt_tokens(second) - llama.prompt_tokens(history) + 16
        assert llama.stats.prompt_tokens_reused - reused_before >= full - 16


async def test_idle_session_is_parked_when_another_starts(tmp_path: Path) -> None:
    # Attention visits every cell in use, so an idle session would slow the others down
    # even with free slots left; it waits in the store and comes back for its next turn.
    async with backend(tmp_path, slots=4) as llama:
        first = await reply(llama, [SYSTEM, TURN1], "a")
        assert llama.store is not None and "a" not in llama.store
        await reply(llama, [ChatMessage("user", "Say hello.")], "b")
        assert "a" in llama.store
        history = [SYSTEM, TURN1, ChatMessage("assistant", first), TURN2]
        before = llama.stats.prompt_tokens_evaluated
        await reply(llama, history, "a")
        assert llama.stats.restored_from_ram == 1
        assert llama.stats.prompt_tokens_evaluated - before < llama.prompt_tokens(history) / 2
        assert "a" not in llama.store and "b" in llama.store


async def test_state_budget_is_respected(tmp_path: Path) -> None:
    ram_budget, disk_budget = 300_000, 1_000_000
    async with backend(tmp_path, slots=2, ram_budget=ram_budget, disk_budget=disk_budget) as llama:
        store = llama.store
        assert store is not None and store.directory is not None
        for i in range(30):
            await reply(llama, [ChatMessage("user", f"Tell me about the number {i}.")], f"s{i}")
            assert store.ram_used <= ram_budget
            assert store.disk_used <= disk_budget
            on_disk = sum(p.stat().st_size for p in store.directory.iterdir())
            assert on_disk <= disk_budget
        # Old sessions were dropped once both budgets were full; they evaluate afresh.
        assert store.dropped > 0
        assert "s0" not in store


@pytest.mark.parametrize("batch_streams", [False, True], ids=["turns", "batched"])
async def test_four_concurrent_streams_complete_interleaved(
    tmp_path: Path, batch_streams: bool
) -> None:
    async with backend(tmp_path, slots=4, batch_streams=batch_streams) as llama:
        firsts: dict[int, float] = {}
        ends: dict[int, float] = {}

        async def stream(i: int) -> tuple[str, str | None, int]:
            params = GenerationParams(max_tokens=40, temperature=0.7, seed=i)
            messages = [ChatMessage("user", f"Write a short poem about the number {i}.")]
            text, finish, produced = "", None, 0
            async for chunk in llama.stream(messages, params, session=f"p{i}"):
                if chunk.text and i not in firsts:
                    firsts[i] = time.perf_counter()
                text += chunk.text
                if chunk.finish_reason:
                    finish, produced = chunk.finish_reason, chunk.completion_tokens
            ends[i] = time.perf_counter()
            return text, finish, produced

        results = await asyncio.gather(*(stream(i) for i in range(4)))
        for text, finish, produced in results:
            assert finish in ("stop", "length")
            assert text.strip()
            assert produced > 0
        # Interleaved: every stream saw its first token before any stream finished.
        assert max(firsts.values()) < min(ends.values())
        # Batched: several streams share one llama_decode; otherwise one stream a decode.
        assert (llama.stats.max_streams_in_batch >= 2) is batch_streams


def test_store_spills_to_disk_and_back(tmp_path: Path) -> None:
    store = StateStore(ram_bytes=10, disk_bytes=1000, directory=tmp_path)
    store.put("a", [1, 2, 3], b"x" * 8)
    store.put("b", [4], b"y" * 8)  # pushes "a" to disk
    assert store.ram_used == 8 and store.disk_used > 0
    assert store.take("a") == ([1, 2, 3], b"x" * 8, "disk")
    assert store.take("b") == ([4], b"y" * 8, "ram")
    assert store.take("a") is None
    assert store.disk_used == 0 and store.ram_used == 0
