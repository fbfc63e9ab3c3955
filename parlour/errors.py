"""Typed errors raised by the core; each API edge renders them in its own dialect's shape."""

from __future__ import annotations


class ParlourError(Exception):
    """Base of every error the core raises on purpose."""

    status = 500
    code = "internal_error"
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ParlourError):
    """The request is malformed or a parameter is out of range."""

    status = 400
    code = "invalid_request"
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param)
        if code is not None:
            self.code = code


class ContextLengthExceeded(InvalidRequest):
    """The new message alone does not fit in the model's context window."""

    code = "context_length_exceeded"


class Unauthorized(ParlourError):
    """No valid credentials were presented."""

    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class NotFound(ParlourError):
    """The thing asked for does not exist or belongs to someone else."""

    status = 404
    code = "not_found"
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    """A request named a model that is not configured (strict mode only)."""

    code = "model_not_found"


class PayloadTooLarge(ParlourError):
    """The request body is larger than the configured limit."""

    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class ModelNotReady(ParlourError):
    """The model is still loading or failed to load."""

    status = 503
    code = "model_not_ready"
    type = "server_error"


class BackendUnavailable(ParlourError):
    """The inference backend cannot be reached."""

    status = 503
    code = "backend_unavailable"
    type = "server_error"


class BackendTimeout(ParlourError):
    """The inference backend did not answer in time."""

    status = 504
    code = "backend_timeout"
    type = "server_error"


class BackendError(ParlourError):
    """Generation failed inside the backend."""

    status = 500
    code = "backend_error"
    type = "server_error"


class Forbidden(ParlourError):
    """The credentials are valid but do not allow this."""

    status = 403
    code = "forbidden"
    type = "permission_error"


class Conflict(ParlourError):
    """The request would duplicate something that must be unique."""

    status = 409
    code = "conflict"
    type = "invalid_request_error"


class RateLimited(ParlourError):
    """A key or owner used up a limit; `retry_after` says in how many seconds it may retry."""

    status = 429
    code = "rate_limit_exceeded"
    type = "requests"

    def __init__(self, message: str, *, retry_after: float, kind: str = "requests") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.type = kind


class Overloaded(ParlourError):
    """The model's queue is full: the request is refused at once instead of waiting."""

    status = 503
    code = "server_overloaded"
    type = "server_error"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
