"""The one place that turns core errors into responses, in the shape of the route's dialect."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import Scope

from ..errors import Overloaded, ParlourError, RateLimited, Unauthorized
from .guard import GuardedRouter
from .schema import BodyDependency, json_request_body
from .wire import encodable

#: Keys of a validation error that repeat what the client sent.
ECHOED = frozenset({"input", "ctx"})

#: Renders (status, message, code, type, param) as a response body for one dialect.
Renderer = Callable[[ParlourError], Any]


def detail_body(error: ParlourError) -> Any:
    """FastAPI's own shape: `{"detail": message}`."""
    return {"detail": error.message}


class DialectRouter(GuardedRouter):
    """A dialect's routes, with the way that dialect writes errors."""

    def __init__(self, *, render_error: Renderer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.render_error = render_error

    def add_api_route(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        """Add a route; one that takes a BodyDependency documents its JSON body."""
        super().add_api_route(path, endpoint, **kwargs)
        route = self.routes[-1]
        assert isinstance(route, APIRoute)
        pending = list(route.dependant.dependencies)
        while pending and route.openapi_extra is None:
            dependency = pending.pop()
            if isinstance(dependency.call, BodyDependency):
                route.openapi_extra = json_request_body(dependency.call.model)
            pending.extend(dependency.dependencies)

    def serves(self, scope: Scope) -> bool:
        """True if one of this router's routes serves the request (or refuses its method)."""
        return any(route.matches(scope)[0] is not Match.NONE for route in self.routes)


def renderer(request: Request) -> Renderer | None:
    """How the dialect of the request's route writes errors; None outside the dialects.
    Also right for errors raised before routing (the auth guard)."""
    routers: list[DialectRouter] = getattr(request.app.state, "dialects", [])
    return next((r.render_error for r in routers if r.serves(request.scope)), None)


def error_response(
    request: Request, error: ParlourError, headers: Mapping[str, str] | None = None
) -> Response:
    """Render `error` for the dialect of the route that serves the request."""
    render = renderer(request) or detail_body
    extra = dict(headers or {})
    if isinstance(error, Unauthorized):
        extra["WWW-Authenticate"] = "Bearer"
    if isinstance(error, RateLimited | Overloaded):
        extra["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse(render(error), status_code=error.status, headers=extra or None)


class _HTTPError(ParlourError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        self.type = "invalid_request_error"


def validation_response(errors: Sequence[Any]) -> Response:
    """A 422 `{"detail": errors}` that never echoes what JSON cannot carry."""
    return JSONResponse({"detail": encodable_errors(errors)}, status_code=422)


def encodable_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors without any echoed value JSON cannot carry (NaN, infinities,
    unpaired surrogates, bytes): such an `input` or `ctx` is left out."""
    safe: list[dict[str, Any]] = []
    for item in errors:
        kept: dict[str, Any] = {}
        for key, value in item.items():
            try:
                encoded = jsonable_encoder(value)
            except ValueError:  # bytes that are not UTF-8, among others
                continue
            if key not in ECHOED or encodable(encoded):
                kept[key] = encoded
        safe.append(kept if encodable(kept) else {"msg": "invalid value", "type": "value_error"})
    return safe


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through error_response so each dialect keeps its shape."""

    async def on_parlour_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ParlourError)
        return error_response(request, exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if renderer(request) is None:
            return JSONResponse(
                {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
            )
        return error_response(
            request, _HTTPError(exc.status_code, str(exc.detail)), headers=exc.headers
        )

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_response(exc.errors())

    app.add_exception_handler(ParlourError, on_parlour_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
