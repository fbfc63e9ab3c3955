"""The embedded backend: session-less prefix reuse, and where llama.cpp's log goes (real model)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from parlour.backends.base import ChatMessage, GenerationParams
from parlour.backends.llama import LlamaBackend
from parlour.models import embedded_gguf
from tests.test_sessions import SYSTEM, backend, reply

pytestmark = pytest.mark.model

QUESTIONS = (
    "Name three animals that live in the sea.",
    "Name three colours of the rainbow.",
    "Name three planets of the solar system.",
)


async def test_interleaved_stateless_histories_reuse_their_prefixes(tmp_path: Path) -> None:
    # Three conversations on two slots, each resending its whole history with no session,
    # interleaved: every second turn finds its first turn's state, resident or parked.
    async with backend(tmp_path, slots=2) as llama:
        histories = [[SYSTEM, ChatMessage("user", q)] for q in QUESTIONS]
        for history in histories:
            history.append(ChatMessage("assistant", await reply(llama, history, None)))
            history.append(ChatMessage("user", "Which one do you like best?"))
        restored = llama.stats.restored_from_ram
        for history in histories:
            evaluated = llama.stats.prompt_tokens_evaluated
            reused = llama.stats.prompt_tokens_reused
            await reply(llama, history, None, max_tokens=4)
            first_prompt = llama.prompt_tokens(history[:2])
            assert llama.stats.prompt_tokens_reused - reused >= first_prompt
            new_work = llama.stats.prompt_tokens_evaluated - evaluated
            assert new_work <= llama.prompt_tokens(history) - first_prompt
        assert llama.stats.restored_from_ram - restored >= 2


async def test_an_unrelated_prompt_does_not_take_over_a_state(tmp_path: Path) -> None:
    async with backend(tmp_path, slots=2) as llama:
        history = [SYSTEM, ChatMessage("user", QUESTIONS[0])]
        history.append(ChatMessage("assistant", await reply(llama, history, None)))
        # Shares only the system prompt: less than half of the first state.
        await reply(llama, [SYSTEM, ChatMessage("user", QUESTIONS[1] * 3)], None, max_tokens=4)
        history.append(ChatMessage("user", "Which one do you like best?"))
        reused = llama.stats.prompt_tokens_reused
        await reply(llama, history, None, max_tokens=4)
        assert llama.stats.prompt_tokens_reused - reused >= llama.prompt_tokens(history[:2])


async def test_llama_cpp_lines_go_to_debug_logging(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="parlour.llama_cpp"):
        async with backend(tmp_path, slots=2) as llama:
            await reply(llama, [ChatMessage("user", "Hi")], None, max_tokens=2)
    assert "llama_context" not in capfd.readouterr().err
    lines = [r for r in caplog.records if r.name == "parlour.llama_cpp"]
    assert any("llama_context" in r.getMessage() for r in lines)
    assert all(r.levelno == logging.DEBUG for r in lines)


async def test_no_sequence_grows_past_the_context_length(tmp_path: Path) -> None:
    llama = LlamaBackend(path=embedded_gguf(), context_length=48, state_dir=tmp_path / "s")
    await llama.load()
    try:
        params = GenerationParams(max_tokens=500, temperature=0.8, seed=1)
        story = [ChatMessage("user", "Tell me a very long story about the sea.")]
        chunks = [c async for c in llama.stream(story, params, session="long")]
    finally:
        await llama.close()
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.prompt_tokens + last.completion_tokens <= 48
