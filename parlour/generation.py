"""A generation running in its own task, shared by persisted turns and stateless completions.

The edge iterates it for text deltas and awaits its result; a client that goes away calls
cancel(). The work runs in a task of its own, so what must be written after a
disconnect (the partial reply, usage figures) is never written from a cancelled scope.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .backends.base import Backend, ChatMessage, FinishReason, GenerationParams
from .errors import BackendError, ParlourError
from .observe import Observer, Watch

log = logging.getLogger(__name__)

R = TypeVar("R")


class TurnCancelled(ParlourError):
    """The client went away before generation started; nothing was written."""

    status = 499
    code = "cancelled"


@dataclass(frozen=True)
class Generated:
    """What the backend produced and how it ended."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    elapsed_ms: int
    cached_tokens: int = 0


class GenerationStream(Generic[R]):
    """Iterate for text deltas, then await result(); cancel() stops it; subclasses do _work()."""

    #: Said when the client leaves before generation starts.
    cancelled_message = "The client went away before generation started."

    def __init__(
        self, running: set[GenerationStream[object]], observer: Observer | None = None
    ) -> None:
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()
        self._output = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._result: asyncio.Future[R] = loop.create_future()
        self._error: ParlourError | None = None
        self._cancel_requested = False
        # Cancelling the task is safe only while it waits (for a lock) or generates;
        # during its writes a cancel request is noted and honoured at the next step.
        self._interruptible = True
        self.model: str | None = None
        self._watch = observer.watch() if observer is not None else Watch()
        self._task = asyncio.create_task(self._run())
        running.add(self)  # type: ignore[arg-type]
        self._task.add_done_callback(lambda _task: running.discard(self))

    async def started(self) -> None:
        """Wait until generation may begin; raises the request's error if it cannot."""
        await asyncio.shield(self._started)

    async def first_output(self) -> None:
        """Wait for the first text, or the end; raise the error if it failed before any.

        Streaming edges wait for this before sending headers, so an upstream that is
        down still gets a proper HTTP status instead of an error event.
        """
        await self._output.wait()
        if self._error is not None and self._deltas.qsize() <= 1:
            raise self._error

    async def result(self) -> R:
        """Wait for the end and return it."""
        return await asyncio.shield(self._result)

    def cancel(self) -> None:
        """Stop: before generation nothing is written; during it the partial reply is kept."""
        if self._task.done() or self._cancel_requested:
            return
        self._cancel_requested = True
        if self._interruptible:
            self._task.cancel()

    async def wait(self) -> None:
        """Wait for the task to finish, however it ends."""
        await asyncio.gather(self._task, return_exceptions=True)

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            delta = await self._deltas.get()
            if delta is None:
                break
            yield delta
        if self._error is not None:
            raise self._error

    def _emit(self, delta: str | None) -> None:
        self._deltas.put_nowait(delta)
        self._output.set()

    def _begin(self) -> None:
        self._started.set_result(None)

    def _finish(self, result: R) -> None:
        self._watch.done(self.model)
        self._result.set_result(result)
        self._emit(None)

    def _fail(self, error: ParlourError) -> None:
        self._watch.done(self.model)
        self._error = error
        for future in (self._started, self._result):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved so an unawaited future never logs a warning
        self._emit(None)

    async def _run(self) -> None:
        try:
            await self._work()
        except asyncio.CancelledError:
            self._fail(TurnCancelled(self.cancelled_message))
        except ParlourError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("generation failed")
            self._fail(BackendError(f"The request failed: {type(exc).__name__}: {exc}"))

    async def _work(self) -> None:
        raise NotImplementedError

    async def _generate(
        self,
        backend: Backend,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        prompt_tokens: int,
        session: str | None = None,
    ) -> Generated:
        """Stream from the backend into this handle; a cancel ends it as `cancelled`."""
        pieces: list[str] = []
        finish: FinishReason = "stop"
        completion_tokens = cached_tokens = 0
        began = time.perf_counter()
        self._interruptible = True
        self._watch.generating()
        generation = backend.stream(messages, params, session=session)
        try:
            if self._cancel_requested:
                raise asyncio.CancelledError
            async for chunk in generation:
                if chunk.text:
                    if not pieces:
                        self._watch.first_token()
                    pieces.append(chunk.text)
                    self._emit(chunk.text)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                    prompt_tokens = chunk.prompt_tokens or prompt_tokens
                    completion_tokens = chunk.completion_tokens
                    cached_tokens = chunk.cached_tokens
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            finish = "cancelled"
        except ParlourError as exc:
            finish, self._error = "error", exc
        except Exception as exc:
            log.exception("generation failed")
            finish = "error"
            self._error = BackendError(f"Generation failed: {type(exc).__name__}: {exc}")
        finally:
            self._interruptible = False
            await generation.aclose()
        text = "".join(pieces)
        if finish in ("cancelled", "error"):
            completion_tokens = backend.count_tokens(text)
        generated = Generated(
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            elapsed_ms=int((time.perf_counter() - began) * 1000),
            cached_tokens=cached_tokens,
        )
        self._watch.generated(generated)
        return generated
