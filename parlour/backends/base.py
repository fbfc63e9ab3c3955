"""The backend contract: stream text deltas for a list of chat messages, stoppable mid-stream."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class ChatMessage:
    """One message as the model sees it."""

    role: Role
    content: str


#: The messages a reply is generated for, oldest first.
Prompt = Sequence[ChatMessage]


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """Sampling settings a request and a backend call share; None means the default."""

    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(frozen=True, kw_only=True)
class GenerationParams(SamplingOptions):
    """What a backend receives for one reply: the sampling settings and its length limit."""

    max_tokens: int


@dataclass
class Chunk:
    """A piece of the reply; the last one carries the finish reason and token counts."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Prompt tokens the backend did not evaluate because a session's state held them.
    cached_tokens: int = 0


class Backend(ABC):
    """A model runtime. Subclasses say what they can do through class attributes."""

    kind: str = "abstract"
    #: Tokens the model can attend to, prompt and reply together (0 until it is known).
    context_length: int = 0

    @property
    def ready(self) -> bool:
        """True once the backend can generate."""
        return True

    async def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights or open connections; called once at start-up."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once at shut-down."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of plain text with the model's tokenizer."""

    @abstractmethod
    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens of the full rendered prompt for these messages, ready for a reply."""

    @abstractmethod
    def stream(
        self, messages: Prompt, params: GenerationParams, *, session: str | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """Generate a reply. Closing the iterator (aclose) stops generation promptly.

        `session` names the conversation so backends can keep per-session state.
        """
