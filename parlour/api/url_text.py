"""Refuses a URL whose path or query holds NUL: no store can hold it (PostgreSQL's text
refuses it), so a name or search that carries one is answered 400, never 500."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InvalidRequest
from .errors import error_response


def has_nul(scope: Scope) -> bool:
    """True when the request's path or query string decodes to text holding NUL."""
    path: str = scope.get("path", "")
    query: bytes = scope.get("query_string", b"")
    return "\x00" in path or b"\x00" in unquote_to_bytes(query.replace(b"+", b" "))


class UrlTextMiddleware:
    """Answers 400, in the dialect's shape, for a URL that holds NUL."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and has_nul(scope):
            error = InvalidRequest(
                "The URL holds a NUL character (%00), which no name or text may contain."
            )
            await error_response(Request(scope), error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install_url_text(app: FastAPI) -> None:
    """Refuse URLs holding NUL on every route."""
    app.add_middleware(UrlTextMiddleware)
