"""What the model sees: system prompts, knowledge, then the newest history that fits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..backends.base import Backend, ChatMessage
from ..errors import ContextLengthExceeded
from ..knowledge import index as knowledge
from ..knowledge.index import Hit

#: Tokens a chat template adds around each message (role markers, separators); an
#: estimate used to pick a cut point, checked afterwards against the exact render. SmolLM2's
#: template frames an assistant message with 6 (`<|im_start|>`, `ass`, `istant`, a newline,
#: `<|im_end|>`, a newline); user and system take 5. Erring high keeps the estimate from
#: undercounting a long history.
MESSAGE_OVERHEAD = 6


@dataclass(frozen=True)
class HistoryItem:
    """A persisted message with its stored token count."""

    message: ChatMessage
    token_count: int


@dataclass(frozen=True)
class FittedContext:
    """The messages to send and how many tokens they take."""

    messages: list[ChatMessage]
    prompt_tokens: int
    dropped: int


def check_fits(
    backend: Backend,
    *,
    system: Sequence[ChatMessage],
    new: ChatMessage,
    reply_budget: int,
) -> int:
    """Raise ContextLengthExceeded unless the system prompt and new message fit; return tokens."""
    needed = backend.prompt_tokens([*system, new])
    limit = backend.context_length - reply_budget
    if needed > limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {backend.context_length} tokens. "
            f"The new message needs {needed} tokens plus {reply_budget} reserved for the "
            "reply. Shorten the message or lower max_tokens.",
            param="messages",
        )
    return needed


def fit_context(
    backend: Backend,
    *,
    system: Sequence[ChatMessage],
    history: Sequence[HistoryItem],
    new: ChatMessage,
    reply_budget: int,
) -> FittedContext:
    """Keep the newest whole messages of `history` that fit with the system prompt and `new`."""
    limit = backend.context_length - reply_budget
    base = check_fits(backend, system=system, new=new, reply_budget=reply_budget)
    # Walk back from the newest message with estimates, then confirm with the exact
    # render: drop more if the estimate was short, take more if it was generous.
    budget = limit - base
    start = len(history)
    used = 0
    while start > 0:
        cost = history[start - 1].token_count + MESSAGE_OVERHEAD
        if used + cost > budget:
            break
        used += cost
        start -= 1
    messages = [*system, *(h.message for h in history[start:]), new]
    exact = backend.prompt_tokens(messages)
    grow = exact <= limit
    while exact > limit and start < len(history):
        start += 1
        messages = [*system, *(h.message for h in history[start:]), new]
        exact = backend.prompt_tokens(messages)
    while grow and start > 0:
        wider = [*system, *(h.message for h in history[start - 1 :]), new]
        tokens = backend.prompt_tokens(wider)
        if tokens > limit:
            break
        messages, exact, start = wider, tokens, start - 1
    return FittedContext(messages=messages, prompt_tokens=exact, dropped=start)


def system_prompt(parts: Sequence[str], hits: Sequence[Hit] = ()) -> str:
    """The system prompt: its parts, then retrieved chunks under `Reference knowledge:`."""
    sections = [p.strip() for p in parts if p.strip()]
    if hits:
        sections.append(knowledge.reference_block(hits))
    return "\n\n".join(sections)


def system_messages(parts: Sequence[str], hits: Sequence[Hit] = ()) -> list[ChatMessage]:
    """The system prompt as the messages to send: none when it is empty."""
    prompt = system_prompt(parts, hits)
    return [ChatMessage("system", prompt)] if prompt else []


def fit_with_knowledge(
    backend: Backend,
    *,
    parts: Sequence[str],
    hits: Sequence[Hit],
    history: Sequence[HistoryItem],
    new: ChatMessage,
    reply_budget: int,
) -> tuple[FittedContext, int]:
    """Fit the context with as many retrieved chunks as fit (the weakest dropped first);
    return it with the number of chunks kept."""
    for keep in range(len(hits), -1, -1):
        try:
            fitted = fit_context(
                backend,
                system=system_messages(parts, hits[:keep]),
                history=history,
                new=new,
                reply_budget=reply_budget,
            )
        except ContextLengthExceeded:
            if keep == 0:
                raise
            continue
        return fitted, keep
    raise AssertionError("unreachable")  # pragma: no cover
