"""The embedded llama.cpp backend, driven directly with the real SmolLM2 model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from parlour.backends import llama as llama_module
from parlour.backends.base import ChatMessage, Chunk, GenerationParams
from parlour.backends.llama import LlamaBackend, StopScanner
from parlour.context import MESSAGE_OVERHEAD
from parlour.models import embedded_gguf

STORY = ChatMessage("user", "Write a very long story about a dragon who learns to bake bread.")


# --- StopScanner -------------------------------------------------------------------


def feed_all(scanner: StopScanner, pieces: Sequence[str]) -> tuple[list[str], bool]:
    """Feed pieces until a stop is reached; the emitted texts and whether it stopped."""
    out: list[str] = []
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(scanner.flush())
    return out, False


def test_stop_string_split_across_chunks() -> None:
    out, stopped = feed_all(StopScanner(["STOP"]), ["Hello S", "T", "OP and more"])
    assert stopped
    assert out == ["Hello ", "", ""]


def test_stop_string_inside_one_chunk_drops_the_rest() -> None:
    out, stopped = feed_all(StopScanner(["\n\n"]), ["one\n", "\ntwo"])
    assert stopped
    assert "".join(out) == "one"


def test_held_back_prefix_is_released_when_no_stop_follows() -> None:
    scanner = StopScanner(["STOP"])
    assert scanner.feed("abc ST") == ("abc ", False)
    assert scanner.feed("ART") == ("START", False)
    assert scanner.feed(" S") == (" ", False)
    assert scanner.flush() == "S"
    assert scanner.flush() == ""


def test_false_start_right_before_a_real_stop() -> None:
    out, stopped = feed_all(StopScanner(["<end>"]), ["x<e", "<en", "d>y"])
    assert stopped
    assert "".join(out) == "x<e"


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = feed_all(StopScanner(["world", "lo w"]), ["hel", "lo wor", "ld"])
    assert stopped
    assert "".join(out) == "hel"


def test_no_stops_passes_text_through() -> None:
    scanner = StopScanner(["", ""])
    assert scanner.feed("S") == ("S", False)
    assert scanner.flush() == ""


# --- the real model ----------------------------------------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[LlamaBackend]:
    """The embedded model, loaded in-process."""
    loaded = LlamaBackend(path=embedded_gguf())
    await loaded.load()
    yield loaded
    await loaded.close()


async def generate(
    backend: LlamaBackend, messages: Sequence[ChatMessage], **params: Any
) -> tuple[list[str], Chunk]:
    """The text chunks of one reply and its final chunk."""
    texts: list[str] = []
    async for chunk in backend.stream(messages, GenerationParams(**params)):
        if chunk.finish_reason is not None:
            return texts, chunk
        texts.append(chunk.text)
    raise AssertionError("the stream ended without a finish reason")


@pytest.mark.model
async def test_stop_string_in_real_generation(backend: LlamaBackend) -> None:
    texts, last = await generate(backend, [STORY], max_tokens=48, temperature=0)
    full = "".join(texts)
    assert last.finish_reason == "length"
    words = full.split()
    stop = f"{words[len(words) // 2]} {words[len(words) // 2 + 1]}"
    texts, last = await generate(backend, [STORY], max_tokens=48, temperature=0, stop=(stop,))
    assert last.finish_reason == "stop"
    assert "".join(texts) == full[: full.index(stop)]
    assert all(stop not in text for text in texts)


@pytest.mark.model
async def test_multibyte_characters_never_split(backend: LlamaBackend) -> None:
    asks = [
        "Repeat exactly: café 🎉 naïve 😀 über",
        "Reply with three party emoji like 🎉 and nothing else.",
        "Write the word 'naïve' and the emoji 😀 twice.",
    ]
    replies: list[str] = []
    for ask in asks:
        texts, _last = await generate(
            backend, [ChatMessage("user", ask)], max_tokens=48, temperature=0
        )
        assert all("\ufffd" not in text for text in texts), texts
        replies.append("".join(texts))
    # Some reply holds a character the tokenizer spells with several tokens, so the
    # decoder really had to hold back partial bytes (greedy replies of a model this
    # small turn on near-ties, so no single prompt is relied on).
    assert any(backend.count_tokens(ch) > 1 for reply in replies for ch in reply), replies


@pytest.mark.model
async def test_same_seed_same_reply(backend: LlamaBackend) -> None:
    ask = [ChatMessage("user", "Tell me a fun fact.")]
    replies: dict[int, str] = {}
    for seed in (1, 2, 3, 1):
        texts, _ = await generate(backend, ask, max_tokens=24, temperature=1.0, seed=seed)
        reply = "".join(texts)
        if seed in replies:
            # The second run also starts from a warm cache: the reply must not change.
            assert reply == replies[seed]
        replies[seed] = reply
    assert len(set(replies.values())) > 1  # the seed really steers sampling


@contextmanager
def reference_tokenizer() -> Iterator[tuple[Llama, Jinja2ChatFormatter]]:
    """llama-cpp-python's own chat formatting with the GGUF's template, vocabulary only."""
    reference = Llama(model_path=str(embedded_gguf()), vocab_only=True, verbose=False)
    try:
        formatter = Jinja2ChatFormatter(
            reference.metadata["tokenizer.chat_template"],
            eos_token="<|im_end|>",
            bos_token="<|im_start|>",
        )
        yield reference, formatter
    finally:
        reference.close()


@pytest.mark.model
async def test_token_counts_match_the_chat_template(backend: LlamaBackend) -> None:
    hello = ChatMessage("user", "Hello, who are you?")
    answer = ChatMessage("assistant", "I am a small model. Ça va? 😀")
    again = ChatMessage("user", "What did I just ask you?")
    conversations = [
        [again],
        [hello, answer, again],
        [ChatMessage("system", "Answer in one word."), hello],
    ]
    with reference_tokenizer() as (reference, formatter):
        for messages in conversations:
            as_dicts: Any = [{"role": m.role, "content": m.content} for m in messages]
            rendered = formatter(messages=as_dicts)
            expected = reference.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
            assert backend.render(messages) == rendered.prompt
            assert backend.prompt_tokens(messages) == len(expected)

    # A message costs its own tokens plus a few for the role markers around it: the
    # estimate fit_context starts from (checked against the exact count afterwards).
    added = backend.prompt_tokens([hello, answer, again]) - backend.prompt_tokens([again])
    own = backend.count_tokens(hello.content) + backend.count_tokens(answer.content)
    assert own < added <= own + 2 * (MESSAGE_OVERHEAD + 1)

    texts, last = await generate(backend, [hello], max_tokens=32, temperature=0)
    assert last.prompt_tokens == backend.prompt_tokens([hello])
    assert last.completion_tokens == backend.count_tokens("".join(texts))


@pytest.mark.model
async def test_follow_up_prompt_reuses_the_cached_prefix(backend: LlamaBackend) -> None:
    texts, first = await generate(backend, [STORY], max_tokens=24, temperature=0)
    reused, evaluated = backend.stats.prompt_tokens_reused, backend.stats.prompt_tokens_evaluated
    follow_up = [STORY, ChatMessage("assistant", "".join(texts)), ChatMessage("user", "Go on.")]
    _, second = await generate(backend, follow_up, max_tokens=4, temperature=0)
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
    # All of the first prompt and most of the reply were still in the KV cache.
    assert backend.stats.prompt_tokens_reused - reused >= first.prompt_tokens
    # The final chunk reports exactly that reuse as cached tokens.
    assert first.cached_tokens == 0
    assert second.cached_tokens == backend.stats.prompt_tokens_reused - reused
    new_work = backend.stats.prompt_tokens_evaluated - evaluated
    assert new_work <= second.prompt_tokens - first.prompt_tokens
    assert backend.stats.generations == 2


@pytest.mark.model
async def test_closing_the_stream_stops_generation(backend: LlamaBackend) -> None:
    stream = backend.stream([STORY], GenerationParams(max_tokens=400, temperature=0))
    first = await anext(stream)
    assert first.text
    await stream.aclose()
    # The thread checks for cancellation after every token; a loaded machine may let a
    # few more through before the close lands, never the 400 asked for.
    assert backend.stats.completion_tokens <= 16
    # The backend is free again and generates normally.
    texts, last = await generate(backend, [STORY], max_tokens=8, temperature=0)
    assert last.completion_tokens == 8
    assert "".join(texts).startswith(first.text)


@pytest.mark.model
async def test_loading_disables_extra_buffer_types(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp.llama_cpp as lib

    # llama.cpp's own default turns the repacking buffers (and the AMX path) on.
    assert lib.llama_model_default_params().use_extra_bufts is True
    original_load = lib.llama_model_load_from_file
    seen: list[bool] = []

    def load(path: bytes, params: Any) -> Any:
        seen.append(bool(params.use_extra_bufts))
        return original_load(path, params)

    monkeypatch.setattr(lib, "llama_model_load_from_file", load)
    backend = LlamaBackend(path=embedded_gguf())
    await backend.load()
    try:
        assert seen == [False]
        # Only parlour's own load changed: llama.cpp's defaults are untouched.
        assert lib.llama_model_default_params().use_extra_bufts is True
    finally:
        await backend.close()


def test_llama_cpp_server_wrapper_disables_extra_buffer_types(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llama_cpp.llama_cpp as lib

    original_default = lib.llama_model_default_params
    with llama_module._without_extra_buffer_types():
        assert lib.llama_model_default_params().use_extra_bufts is False
    assert lib.llama_model_default_params is original_default
    assert lib.llama_model_default_params().use_extra_bufts is True
