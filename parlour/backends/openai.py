"""An upstream backend: any OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama, OpenAI).

Replies stream through without buffering. Before the first token, a connection
error or a 5xx answer moves on to the next configured endpoint; after it, the
reply is never retried (the client already has part of it). Closing the stream
(a client disconnect) closes the upstream request too.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import httpx

from ..errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    UpstreamStatusError,
)
from .base import Backend, ChatMessage, Chunk, FinishReason, GenerationParams, Prompt

log = logging.getLogger(__name__)

#: Bytes of text per token when the upstream's tokenizer is not at hand: a
#: conservative estimate (real tokenizers average closer to four) so that
#: context fitting errs on the side of sending less.
BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD = 4


class OpenAIBackend(Backend):
    """Streams chat completions from one or more OpenAI-compatible endpoints, in failover order."""

    kind = "openai"

    def __init__(
        self,
        *,
        base_urls: Sequence[str],
        model: str,
        api_key_env: str | None = None,
        context_length: int = 8192,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
    ) -> None:
        if not base_urls:
            raise ValueError("the openai backend needs at least one base_url")
        self.base_urls = [url.rstrip("/") for url in base_urls]
        self.model = model
        self.api_key_env = api_key_env
        self.context_length = context_length
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client: httpx.AsyncClient | None = None

    @property
    def ready(self) -> bool:
        return self._client is not None

    async def load(self) -> None:
        if self.api_key_env and not os.environ.get(self.api_key_env):
            log.warning(
                "%s is not set; requests to %s go without an API key",
                self.api_key_env,
                self.base_urls[0],
            )
        self._client = httpx.AsyncClient(timeout=self.timeout)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(self.count_tokens(m.content) + MESSAGE_OVERHEAD for m in messages) + 3

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _body(self, messages: Sequence[ChatMessage], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
        }
        optional = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "stop": list(params.stop) or None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    async def stream(
        self, messages: Prompt, params: GenerationParams, *, session: str | None = None
    ) -> AsyncGenerator[Chunk, None]:
        if self._client is None:
            raise BackendUnavailable("The upstream backend is not started.")
        body = self._body(messages, params)
        failures: list[str] = []
        for base_url in self.base_urls:
            started = False
            try:
                async for chunk in self._stream_one(base_url, body):
                    started = started or bool(chunk.text)
                    yield chunk
                return
            except UpstreamStatusError as exc:
                if exc.status >= 500 and not started:
                    failures.append(f"{base_url}: HTTP {exc.status}")
                    continue
                if exc.status in (400, 422):
                    raise InvalidRequest(
                        f"The upstream model rejected the request: {exc.message}"
                    ) from exc
                raise BackendError(
                    f"The upstream at {base_url} answered HTTP {exc.status}: {exc.message}"
                ) from exc
            except httpx.TimeoutException as exc:
                raise BackendTimeout(
                    f"The upstream at {base_url} did not answer within "
                    f"{self.timeout.read or 0:.0f}s ({type(exc).__name__})."
                ) from exc
            except httpx.TransportError as exc:
                if started:
                    raise BackendError(
                        f"The connection to the upstream at {base_url} broke mid-reply: {exc!r}"
                    ) from exc
                failures.append(f"{base_url}: {type(exc).__name__}")
                continue
        raise BackendUnavailable(
            "No upstream endpoint could serve the request ("
            + "; ".join(failures)
            + "). Check that the inference servers are running."
        )

    async def _stream_one(self, base_url: str, body: dict[str, Any]) -> AsyncGenerator[Chunk, None]:
        assert self._client is not None
        url = f"{base_url}/chat/completions"
        async with self._client.stream("POST", url, json=body, headers=self._headers()) as resp:
            if resp.status_code >= 400:
                raw = await resp.aread()
                raise UpstreamStatusError(resp.status_code, _error_message(raw))
            finish: FinishReason = "stop"
            prompt_tokens = completion_tokens = pieces = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if "error" in event:
                    raise BackendError(f"The upstream reported: {_error_message(data.encode())}")
                usage = event.get("usage")
                if usage:
                    prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    completion_tokens = int(usage.get("completion_tokens") or 0)
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        pieces += 1
                        yield Chunk(text=text)
                    reason = choice.get("finish_reason")
                    if reason:
                        finish = "length" if reason == "length" else "stop"
            # Servers that ignore stream_options send no usage; each streamed piece
            # is then one token, which is how llama.cpp and vLLM stream.
            yield Chunk(
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens or pieces,
            )


def _error_message(raw: bytes) -> str:
    """The message inside an upstream error body, or the body itself."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:500] or "no details"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    if isinstance(data, dict) and data.get("detail"):
        return str(data["detail"])
    return text[:500]
