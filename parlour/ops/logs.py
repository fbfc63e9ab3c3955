"""Log lines that name their request: a context filter, a JSON formatter, and set-up."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

#: Attributes a record may carry beyond the standard ones; each becomes a JSON field.
EXTRA_FIELDS = ("request_id", "method", "path", "route", "status", "owner_id", "latency_ms")
TEXT_FORMAT = "%(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestWatch(Protocol):
    """What a route follows of its request: headers for its response, the generations it
    starts (which may outlive the response: a background response), and its end."""

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers the response gets."""
        ...

    def began(self) -> None:
        """A generation of this request began."""
        ...

    def generated(self, tokens: int) -> None:
        """A generation of this request used `tokens` (prompt and completion)."""
        ...

    def ended(self) -> None:
        """A generation of this request ended, however it ended."""
        ...

    def closed(self) -> None:
        """The request is over: its response was sent, or its client went away."""
        ...


@dataclass
class RequestInfo:
    """What the log lines of one request say about it; `state` is the ASGI scope's state."""

    request_id: str
    method: str
    path: str
    state: dict[str, Any] = field(default_factory=dict)
    #: Set by a route that follows its request (the limits: api.guard).
    watch: RequestWatch | None = None

    @property
    def owner_id(self) -> str | None:
        """The owner the request acts for, once authentication has resolved it."""
        principal = self.state.get("principal")
        owner = getattr(principal, "owner_id", None)
        return str(owner) if owner is not None else None


#: The request being served in this task (and the tasks it starts); None outside one.
current_request: ContextVar[RequestInfo | None] = ContextVar("parlour_request", default=None)


class RequestContextFilter(logging.Filter):
    """Adds the current request's id and owner to every record (`-` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = current_request.get()
        if not hasattr(record, "request_id"):
            record.request_id = info.request_id if info is not None else "-"
        if info is not None:
            if not hasattr(record, "owner_id"):
                record.owner_id = info.owner_id
            if not hasattr(record, "method"):
                record.method = info.method
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "-":
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for `--log-format`: `json` or `text`."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"Unknown log format {log_format!r}: use `text` or `json`.")


def configure(*, level: str, log_format: str) -> None:
    """Send every logger (uvicorn's too) to stderr in one format, request ids included."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_log = logging.getLogger(name)
        uvicorn_log.handlers.clear()
        uvicorn_log.propagate = True
    # parlour.access replaces uvicorn's access log, which knows no request ids.
    logging.getLogger("uvicorn.access").disabled = True
