"""Request ids, the access log and request metrics: the outermost middleware."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..ops.logs import RequestInfo, current_request
from ..ops.metrics import Metrics

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


def _route(scope: Scope) -> tuple[str, str]:
    """The matched route's template and dialect (its first tag); unmatched paths share one."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template is None:
        return "unmatched", "none"
    tags = getattr(route, "tags", None) or ["none"]
    return str(template), str(tags[0])


class RequestContextMiddleware:
    """Gives every request an id (echoed as x-request-id and set on its log lines), adds
    the headers a route's RequestWatch asks for and tells it when the request is over,
    then logs the request with its latency and counts it in the metrics."""

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
                extra = [(b"x-request-id", header)]
                if info.watch is not None:
                    extra += info.watch.response_headers()
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if info.watch is not None:
                info.watch.closed()
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
