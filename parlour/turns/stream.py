"""The one running turn: lock, plan, fit, generate, persist (or not) and record usage.

An edge starts a turn with Engine.start() and uses it as an async context manager:
iterate it for text deltas, then await result() (or finish() for both); leaving the
block cancels it, and a cancelled turn keeps its partial reply. The work runs in a task
of its own, so what must be written after a disconnect (the partial reply, usage
figures) is never written from a cancelled scope.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from ..backends.base import Backend, ChatMessage, FinishReason, GenerationParams
from ..bounds import tokenising
from ..errors import (
    BackendError,
    ContextLengthExceeded,
    InvalidRequest,
    ParlourError,
    SessionMoved,
    TurnCancelled,
)
from . import persist
from .context import HistoryItem, fit_with_knowledge
from .core import Core
from .plan import load_bot, retrieve, settle
from .request import Generated, Messages, Session, Stored, TurnRequest, TurnResult

log = logging.getLogger(__name__)

#: Attempts at a session turn whose key moves to another conversation meanwhile.
SESSION_ATTEMPTS = 3


class Turn:
    """A running turn: iterate it for text deltas, then await result(); cancel() stops it."""

    def __init__(self, engine: Core, request: TurnRequest) -> None:
        self.engine = engine
        self.request = request
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()
        self._output = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._result: asyncio.Future[TurnResult] = loop.create_future()
        self._error: ParlourError | None = None
        self._cancel_requested = False
        # Cancelling the task is safe only while it waits (for a lock) or generates;
        # during its writes a cancel request is noted and honoured at the next step.
        self._interruptible = True
        #: The name of the model that answers, once the turn has its plan.
        self.model: str | None = None
        self._watch = engine.observer.watch()
        self._task = asyncio.create_task(self._run())
        engine.running.add(self)
        self._task.add_done_callback(lambda _task: engine.running.discard(self))

    async def __aenter__(self) -> Turn:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

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

    async def result(self) -> TurnResult:
        """Wait for the end and return it."""
        return await asyncio.shield(self._result)

    async def finish(self) -> TurnResult:
        """Let the turn run to its end without reading its deltas, and return the result."""
        async for _ in self:
            pass
        return await self.result()

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

    def _finish(self, result: TurnResult) -> None:
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
            if isinstance(self.request.target, Messages):
                await self._unpersisted(self.request.target)
            else:
                await self._persisted()
        except asyncio.CancelledError:
            self._fail(TurnCancelled("The client went away before the turn started."))
        except ParlourError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("turn failed")
            self._fail(BackendError(f"The request failed: {type(exc).__name__}: {exc}"))

    def _check_cancel(self) -> None:
        if self._cancel_requested:
            raise asyncio.CancelledError

    async def _unpersisted(self, target: Messages) -> None:
        engine, request = self.engine, self.request
        bot = await load_bot(engine.db, request.bot)
        plan = await tokenising(len(request.new.content), settle, engine.models, request, bot=bot)
        self.model = plan.model.spec.name
        backend = plan.backend
        hits = await retrieve(engine.db, request, bot, [*target.history, request.new])
        fitted, kept = await tokenising(
            sum(len(m.content) for m in (*target.history, request.new)),
            lambda: fit_with_knowledge(
                backend,
                parts=plan.system,
                hits=hits,
                history=[HistoryItem(m, backend.count_tokens(m.content)) for m in target.history],
                new=request.new,
                reply_budget=plan.reserve,
            ),
        )
        if fitted.dropped and not request.truncate:
            raise ContextLengthExceeded(
                f"The messages need more than the model's window of {backend.context_length} "
                f"tokens leaves with {plan.reserve} kept for the reply; send less, or allow "
                "truncation (truncation='auto') to drop the oldest turns.",
                param="input",
            )
        self._check_cancel()
        self._started.set_result(None)
        generated = await self._generate(
            backend,
            fitted.messages,
            plan.sampling.params(plan.max_tokens(fitted.prompt_tokens)),
            prompt_tokens=fitted.prompt_tokens,
            session=target.session,
        )
        await persist.record_usage(engine.db, request, plan, generated)
        self._finish(persist.result(plan, generated, knowledge=tuple(hits[:kept])))

    async def _persisted(self) -> None:
        engine, request = self.engine, self.request
        target = request.target
        for attempt in range(SESSION_ATTEMPTS):
            if isinstance(target, Stored):
                conversation_id = target.id
            else:
                conversation_id = await engine.sessions.conversation_id(request, fresh=attempt > 0)
            self._interruptible = True
            asked = time.perf_counter()
            try:
                async with engine.locks.hold(conversation_id):
                    self._watch.lock_waited(time.perf_counter() - asked)
                    self._interruptible = False
                    await self._locked_turn(conversation_id)
                return
            except SessionMoved:
                assert isinstance(target, Session)
                engine.sessions.forget(request.owner_id, target.key)
        raise InvalidRequest("Could not open the session; try again.")  # pragma: no cover

    async def _locked_turn(self, conversation_id: object) -> None:
        self._check_cancel()
        opened = await persist.open_turn(self.engine, self.request, conversation_id)
        self.model = opened.plan.model.spec.name
        size = len(self.request.new.content) + sum(len(h.message.content) for h in opened.history)
        fitted, _kept = await tokenising(
            size,
            fit_with_knowledge,
            opened.plan.backend,
            parts=opened.plan.system,
            hits=opened.hits,
            history=opened.history,
            new=self.request.new,
            reply_budget=opened.plan.reserve,
        )
        self._started.set_result(None)
        generated = await self._generate(
            opened.plan.backend,
            fitted.messages,
            opened.plan.sampling.params(opened.plan.max_tokens(fitted.prompt_tokens)),
            prompt_tokens=fitted.prompt_tokens,
            session=str(opened.conversation.id),
        )
        self._finish(await persist.close_turn(self.engine, self.request, opened, generated))

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
            self._check_cancel()
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
            cached_tokens=cached_tokens,
            elapsed_ms=int((time.perf_counter() - began) * 1000),
        )
        self._watch.generated(generated)
        return generated
