"""The app-wide auth guard: every path but /health (and the API docs) needs a valid token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth import Authenticator
from ..errors import Unauthorized
from .browser import local_refusal
from .errors import error_response
from .health import HEALTH_PATHS
from .schema import declare_guard_statuses

HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key from `parlour key create` or a JWT (HS256, RS256 or ES256). "
    "Needed on every route but /health once any authentication is configured.",
}


def public_paths(app: FastAPI) -> frozenset[str]:
    """Paths answered without a token: the health probe, the API's own description, and
    whatever app.state.public_paths adds (the chat page and its files)."""
    docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    extra: frozenset[str] = getattr(app.state, "public_paths", frozenset())
    return frozenset({*HEALTH_PATHS, *(p for p in docs if p), *extra})


class AuthMiddleware:
    """Resolves the request's principal before routing, so no route can forget to check.

    A refusal is rendered in the shape of the dialect that owns the path.
    """

    def __init__(self, app: ASGIApp, *, public: frozenset[str]) -> None:
        self.app = app
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        auth: Authenticator | None = getattr(request.app.state, "auth", None)
        if auth is not None:
            try:
                principal = await auth.principal(request.headers.get("authorization"))
            except Unauthorized as exc:
                await error_response(request, exc)(scope, receive, send)
                return
            request.state.principal = principal
            if principal is auth.local:
                refusal = local_refusal(request, request.app.state.settings)
                if refusal is not None:
                    await error_response(request, refusal)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _document(generate: Callable[[], dict[str, Any]], public: frozenset[str]) -> dict[str, Any]:
    schema = generate()
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearerAuth"] = BEARER_SCHEME
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            if path in public:
                operation["security"] = []
                continue
            operation["security"] = [{"bearerAuth": []}]
            declare_guard_statuses(operation)
            operation.setdefault("responses", {}).setdefault(
                "401",
                {
                    "description": "Missing or invalid bearer token, in this dialect's error "
                    "shape.",
                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                },
            )
    return schema


def install_auth(app: FastAPI) -> None:
    """Guard every route with app.state.auth and describe the bearer scheme in /openapi.json."""
    public = public_paths(app)
    app.add_middleware(AuthMiddleware, public=public)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(generate, public)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
