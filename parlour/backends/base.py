"""The backend contract: stream text deltas for a list of chat messages, stoppable mid-stream."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class ChatMessage:
    """One message as the model sees it."""

    role: Role
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one reply; None means the backend's default."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass
class Chunk:
    """A piece of the reply; the last one carries the finish reason and token counts."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Prompt tokens not evaluated because the session's state already held them.
    cached_tokens: int = 0


@dataclass
class BackendInfo:
    """What the server reports about a loaded backend."""

    kind: str
    context_length: int
    details: dict[str, str] = field(default_factory=dict)


class Backend(ABC):
    """A model runtime. Subclasses say what they can do through class attributes."""

    kind: str = "abstract"
    #: Whether token counts come from the model's real tokenizer.
    exact_tokens: bool = True

    @property
    @abstractmethod
    def context_length(self) -> int:
        """Tokens the model can attend to, prompt and reply together."""

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
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        session: str | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Generate a reply. Closing the iterator (aclose) stops generation promptly.

        `session` names the conversation so backends can keep per-session state.
        """
