"""Request ids and the access log (outermost), and limits and admission (after auth)."""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Overloaded, ParlourError, RateLimited
from ..ops.logs import RequestInfo, current_request
from ..ops.metrics import Metrics
from ..ops.ratelimit import Admission, RateLimiter, Standing, is_generation
from .errors import error_response, renderer
from .openai_protocol import error_body as openai_error

access_log = logging.getLogger("parlour.access")

REQUEST_ID = "x-request-id"
#: A client's request id is kept when it looks like an id: no spaces, quotes or controls.
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")


def request_id(scope: Scope) -> str:
    """The client's x-request-id if it is sane, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _SANE_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _tokens() -> int:
    """Tokens the current request's generations used so far."""
    info = current_request.get()
    return info.tokens if info is not None else 0


def _route(scope: Scope) -> tuple[str, str]:
    """The matched route's template and dialect (its first tag); unmatched paths share one."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template is None:
        return "unmatched", "none"
    tags = getattr(route, "tags", None) or ["none"]
    return str(template), str(tags[0])


class RequestContextMiddleware:
    """Gives every request an id (echoed as x-request-id and set on its log lines), then
    logs it with its latency and counts it in the metrics."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        ident = request_id(scope)
        info = RequestInfo(ident, scope["method"], scope["path"], scope.setdefault("state", {}))
        token = current_request.set(info)
        status = 500
        header = ident.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", header)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, info, status, time.perf_counter() - began)
            current_request.reset(token)

    def _record(self, scope: Scope, info: RequestInfo, status: int, seconds: float) -> None:
        route, dialect = _route(scope)
        if self.metrics is not None:
            self.metrics.observe_request(
                route=route, method=info.method, dialect=dialect, status=status, seconds=seconds
            )
        latency_ms = round(seconds * 1000, 1)
        access_log.info(
            "%s %s %d %.1fms",
            info.method,
            info.path,
            status,
            latency_ms,
            extra={"path": info.path, "route": route, "status": status, "latency_ms": latency_ms},
        )


def _speaks_openai(scope: Scope) -> bool:
    """True for routes whose errors are OpenAI's: they carry x-ratelimit-* headers."""
    return renderer(Request(scope)) is openai_error


class GuardMiddleware:
    """Applies per-key limits and admission to generations, and puts OpenAI's
    x-ratelimit-* headers on every OpenAI-dialect response of a limited key."""

    def __init__(self, app: ASGIApp, *, admission: Admission, metrics: Metrics | None) -> None:
        self.app = app
        self.admission = admission
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get("state", {}).get("principal") if scope["type"] == "http" else None
        if principal is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        generation = is_generation(scope["method"], path)
        speaks_openai = _speaks_openai(scope)
        if not generation and not speaks_openai:
            await self.app(scope, receive, send)
            return
        owner = principal.owner_id
        try:
            if generation:
                self.admission.enter(owner)
        except ParlourError as exc:
            await self._refuse(scope, receive, send, exc, None)
            return
        limiter: RateLimiter = scope["app"].state.limiter
        spent = not generation
        try:
            standing = await limiter.check(principal, consume=generation)
            if standing.refusal is not None:
                spent = True
                await self._refuse(scope, receive, send, standing.refusal, standing)
                return
            extra = [(k.encode(), v.encode()) for k, v in standing.headers()]
            if not speaks_openai:
                extra = []

            async def send_guarded(message: Message) -> None:
                nonlocal spent
                if message["type"] == "http.response.start" and extra:
                    message["headers"] = [*message.get("headers", []), *extra]
                elif not spent and not message.get("more_body", False):
                    # Counted before the response ends, so the client's next request
                    # (to this process) already sees these tokens.
                    spent = True
                    limiter.spend(principal, _tokens())
                await send(message)

            await self.app(scope, receive, send_guarded)
        finally:
            if generation:
                self.admission.leave(owner)
            if not spent:
                limiter.spend(principal, _tokens())

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        error: ParlourError,
        standing: Standing | None,
    ) -> None:
        """Answer 429 or 503 in the dialect's shape with Retry-After (and the limits)."""
        if self.metrics is not None:
            if isinstance(error, Overloaded):
                self.metrics.rejected.inc()
            elif isinstance(error, RateLimited):
                self.metrics.limited.labels(error.type).inc()
        response = error_response(Request(scope, receive), error)
        retry: Any = getattr(error, "retry_after", None)
        if retry is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(retry)))
        if standing is not None and _speaks_openai(scope):
            for name, value in standing.headers():
                response.headers.append(name, value)
        await response(scope, receive, send)
