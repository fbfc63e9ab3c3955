"""Per-key limits and admission, declared by the routes that need them.

An endpoint marked `@generation` asks the model for a reply: admission bounds it, and
it counts against (and may be refused at) its principal's limits. A router made with
`limit_headers=True` (the OpenAI dialects) puts OpenAI's x-ratelimit-* headers on every
response of a limited principal. `GuardedRouter` gives such routes the `Limits`
dependency when they are added; other routes pay nothing. The dependency follows its
request through a RequestWatch: the outermost middleware (api.middleware) asks it for
the headers and tells it when the request is over; the engine's RequestMeter tells it
about the request's generations, whose tokens count as soon as they are known and which
hold their admission until they end, even after the response (a background response).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends
from starlette.requests import Request

from ..auth import Principal
from ..errors import Overloaded, ParlourError, RateLimited
from ..ops.logs import current_request
from ..ops.metrics import Metrics
from ..ops.ratelimit import Admission, RateLimiter, Standing

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
_GENERATES = "__parlour_generates__"


def generation(endpoint: Endpoint) -> Endpoint:
    """Mark a route's endpoint as one that asks the model for a reply (put it below the
    route decorator)."""
    setattr(endpoint, _GENERATES, True)
    return endpoint


class GuardedRouter(APIRouter):
    """A router whose generation routes are limited, and whose routes carry OpenAI's
    x-ratelimit-* headers when `limit_headers` is set."""

    def __init__(self, *, limit_headers: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit_headers = limit_headers

    def add_api_route(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        """Add a route, with the Limits dependency if it generates or shows limits."""
        generates = bool(getattr(endpoint, _GENERATES, False))
        if generates or self.limit_headers:
            limits = Depends(Limits(generates=generates, headers=self.limit_headers))
            kwargs["dependencies"] = [*(kwargs.get("dependencies") or []), limits]
        super().add_api_route(path, endpoint, **kwargs)


def _count(metrics: Metrics | None, refusal: ParlourError) -> None:
    if metrics is None:
        return
    if isinstance(refusal, Overloaded):
        metrics.rejected.inc()
    elif isinstance(refusal, RateLimited):
        metrics.limited.labels(refusal.type).inc()


class Limits:
    """The dependency: admits a generation, checks (and with a generation, uses) the
    principal's limits, and raises the refusal (429 or 503 in the dialect's shape)."""

    def __init__(self, *, generates: bool, headers: bool) -> None:
        self.generates = generates
        self.headers = headers

    async def __call__(self, request: Request) -> None:
        principal: Principal | None = request.scope.get("state", {}).get("principal")
        info = current_request.get()
        if principal is None or info is None:
            return
        state = request.app.state
        watch = _Watch(principal, state.limiter, headers=self.headers)
        if self.generates:
            admission: Admission = state.admission
            try:
                admission.enter(principal.owner_id)
            except ParlourError as exc:
                _count(state.metrics, exc)
                raise
            watch.admission = admission
        info.watch = watch
        watch.standing = await watch.limiter.check(principal, consume=self.generates)
        refusal = watch.standing.refusal
        if refusal is not None:
            _count(state.metrics, refusal)
            raise refusal


class _Watch:
    """One guarded request: the headers its response gets, the tokens its generations
    use, and the admission it holds until it is over and its generations have ended (a
    background response generates after its response is sent)."""

    __slots__ = ("admission", "generations", "headers", "limiter", "open", "principal", "standing")

    def __init__(self, principal: Principal, limiter: RateLimiter, *, headers: bool) -> None:
        self.principal = principal
        self.limiter = limiter
        self.headers = headers
        self.standing: Standing | None = None
        self.admission: Admission | None = None
        self.generations = 0
        self.open = True

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers, where the route shows them."""
        if not self.headers or self.standing is None:
            return []
        return [(k.encode(), v.encode()) for k, v in self.standing.headers()]

    def began(self) -> None:
        """A generation of this request began."""
        self.generations += 1

    def generated(self, tokens: int) -> None:
        """Count the tokens now: the client's next request (to this process) sees them,
        though the reply may still be on its way."""
        self.limiter.spend(self.principal, tokens)

    def ended(self) -> None:
        """A generation of this request ended."""
        self.generations -= 1
        self._release()

    def closed(self) -> None:
        """The request is over, answered or not."""
        self.open = False
        self._release()

    def _release(self) -> None:
        if self.admission is not None and not self.open and self.generations <= 0:
            self.admission.leave(self.principal.owner_id)
            self.admission = None
