"""Typed errors raised by the core; each API edge renders them in its own dialect's shape."""

from __future__ import annotations

from typing import Any


class ParlourError(Exception):
    """Base of every error the core raises on purpose; subclasses set their HTTP status,
    code and OpenAI error type as class keywords."""

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __init_subclass__(
        cls, *, status: int | None = None, code: str | None = None, type: str | None = None
    ) -> None:
        super().__init_subclass__()
        cls.status = status if status is not None else cls.status
        cls.code = code if code is not None else cls.code
        cls.type = type if type is not None else cls.type


class InvalidRequest(
    ParlourError, status=400, code="invalid_request", type="invalid_request_error"
):
    """The request is malformed or a parameter is out of range."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param)
        if code is not None:
            self.code = code


class MessageTooLong(InvalidRequest, code="message_too_long"):
    """A message is longer than PARLOUR_MAX_MESSAGE_CHARS."""


class ContextLengthExceeded(InvalidRequest, code="context_length_exceeded"):
    """The new message alone does not fit in the model's context window."""


class Unauthorized(ParlourError, status=401, code="invalid_api_key", type="authentication_error"):
    """No valid credentials were presented."""


class NotFound(ParlourError, status=404, code="not_found", type="invalid_request_error"):
    """The thing asked for does not exist or belongs to someone else."""


class ModelNotFound(NotFound, code="model_not_found"):
    """A request named a model that is not configured (strict mode only)."""


class PayloadTooLarge(
    ParlourError, status=413, code="request_too_large", type="invalid_request_error"
):
    """The request body is larger than the configured limit."""


class ModelNotReady(ParlourError, status=503, code="model_not_ready", type="server_error"):
    """The model is still loading or failed to load."""


class BackendUnavailable(ParlourError, status=503, code="backend_unavailable", type="server_error"):
    """The inference backend cannot be reached."""


class BackendTimeout(ParlourError, status=504, code="backend_timeout", type="server_error"):
    """The inference backend did not answer in time."""


class BackendError(ParlourError, status=500, code="backend_error", type="server_error"):
    """Generation failed inside the backend."""


class Forbidden(ParlourError, status=403, code="forbidden", type="permission_error"):
    """The credentials are valid but do not allow this."""


class UnsupportedMediaType(
    ParlourError, status=415, code="unsupported_media_type", type="invalid_request_error"
):
    """The body is not in a format the route reads."""


class ServerShuttingDown(ParlourError, status=503, code="server_shutting_down"):
    """The server is shutting down; the generation was stopped."""


class Conflict(ParlourError, status=409, code="conflict", type="invalid_request_error"):
    """The request would duplicate something that must be unique."""


class BotNotFound(NotFound):
    """A request names a bot that does not exist; `ref` is the uid or slug it gave."""

    def __init__(self, ref: str) -> None:
        super().__init__("Bot not found")
        self.ref = ref


class SessionMoved(ParlourError, status=409, code="session_moved"):
    """The session key no longer names the conversation a turn was started on."""


class TurnCancelled(ParlourError, status=499, code="cancelled"):
    """The client went away before generation started; nothing was written."""


class UpstreamStatusError(ParlourError):
    """An upstream answered with an error status before any token."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyUnreadable(InvalidRequest):
    """The body is not text at all (FastAPI answers 400 for this, not 422)."""


class BodyInvalid(ParlourError, status=422, code="invalid_body"):
    """The body failed validation; `errors` is the `detail` list of a 422 response."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = errors


class PreviousResponseNotFound(NotFound, code="previous_response_not_found"):
    """`previous_response_id` names no response of this owner."""


class RateLimited(ParlourError, status=429, code="rate_limit_exceeded", type="requests"):
    """A key or owner used up a limit; `retry_after` says in how many seconds it may retry."""

    def __init__(self, message: str, *, retry_after: float, kind: str = "requests") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.type = kind


class Overloaded(ParlourError, status=503, code="server_overloaded"):
    """The model's queue is full: the request is refused at once instead of waiting."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
