"""One Settings object: defaults, then PARLOUR_* environment variables, then explicit values."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SESSIONLESS_MODES = ("reject", "stateless")


def default_data_dir() -> Path:
    """Where parlour keeps its database and state when no directory is given."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "parlour"


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start; built once and passed to create_app."""

    host: str = "127.0.0.1"
    port: int = 8900
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None
    model: str | None = None
    config: Path | None = None
    insecure: bool = False
    workers: int = 1
    max_body_bytes: int = 1_000_000
    #: Document uploads under /admin/ may be larger than other bodies.
    max_upload_bytes: int = 64 * 1024 * 1024
    #: Longest user message, in characters.
    max_message_chars: int = 100_000
    #: Memory for the newest messages of recently active conversations (MiB, roughly).
    history_cache_mb: int = 64
    #: Host names served in local mode besides the loopback names.
    allowed_hosts: tuple[str, ...] = ()
    #: Origins whose pages may call the API (CORS); others are refused in local mode.
    cors_origins: tuple[str, ...] = ()
    #: Seconds without a token after which kernel2 streams send a `: heartbeat` comment.
    heartbeat_seconds: float = 10.0
    strict_models: bool = False
    llama_threads: int | None = None
    jwt_secret: str | None = None
    jwt_public_key: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    #: What /v1/chat/completions does with a request that names no session: "reject"
    #: (400) or "stateless" (the request's messages are the whole context).
    sessionless: str = "reject"
    #: Take the OpenAI `user` field as the session key when no other carrier names one.
    session_from_user: bool = False

    def __post_init__(self) -> None:
        if self.sessionless not in SESSIONLESS_MODES:
            raise ValueError(
                f"PARLOUR_SESSIONLESS must be one of {', '.join(SESSIONLESS_MODES)}, "
                f"not {self.sessionless!r}."
            )

    #: The Responses API's `truncation` when a request leaves it out: `auto` drops the
    #: oldest turns to fit the window, `disabled` answers 400 context_length_exceeded.
    responses_truncation: str = "auto"
    #: `text` or `json` (one object per line); the level of the server's log.
    log_format: str = "text"
    log_level: str = "info"
    #: Serve /metrics and record generations for it.
    metrics: bool = True
    #: Limits for every key and JWT subject; a key's own values (`parlour key update`) win.
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    #: Generations one owner may have in flight in one process.
    max_concurrent_per_owner: int | None = None
    #: Generations one process holds at once (running or waiting); beyond it, 503.
    max_queue: int | None = None
    #: A `limits` storage URI for request counters (e.g. redis://host:6379); default:
    #: this process's memory on SQLite, the database itself on PostgreSQL.
    rate_limit_storage: str | None = None

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'parlour.db'}"

    def to_env(self) -> dict[str, str]:
        """PARLOUR_* variables that rebuild these settings in another process."""
        env: dict[str, str] = {}
        for name, option in OPTIONS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool):
                env[option.env] = "1" if value else "0"
            elif isinstance(value, tuple):
                env[option.env] = ",".join(value)
            else:
                env[option.env] = str(value)
        return env

    @property
    def cache_dir(self) -> Path:
        """Derived files (converted model weights), rebuilt when missing; safe to delete."""
        return self.data_dir / "cache"

    @property
    def models_dir(self) -> Path:
        """Models pulled with `parlour model pull`."""
        return self.data_dir / "models"

    @property
    def is_loopback(self) -> bool:
        """True when the server only listens on the local machine."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from PARLOUR_* variables, with explicit overrides winning."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, option in OPTIONS.items():
            raw = source.get(option.env)
            if raw is not None and raw != "":
                values[name] = option.parse(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def boolean(raw: str) -> bool:
    """A yes/no setting's text: 1, true, yes or on."""
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


@dataclass(frozen=True)
class Option:
    """One setting: its environment variable, how its text is read, and what it means."""

    env: str
    parse: Callable[[str], Any]
    help: str
    #: What help text shows as the default when the value itself would not say it well.
    default_text: str | None = None

    def describe(self, name: str) -> str:
        """Help text: the meaning, then the variable and the default in brackets."""
        default = self.default_text
        if default is None:
            value = Settings.__dataclass_fields__[name].default
            default = None if value in (None, False, MISSING, ()) else str(value)
        return f"{self.help} [{self.env}" + (f"; {default}]" if default else "]")


#: Every setting read from the environment; CLI flags and their help are built from it.
OPTIONS: dict[str, Option] = {
    "host": Option("PARLOUR_HOST", str, "Address to listen on."),
    "port": Option("PARLOUR_PORT", int, "Port."),
    "data_dir": Option(
        "PARLOUR_DATA_DIR", Path, "Where the database and state live.", "~/.local/share/parlour"
    ),
    "database_url": Option(
        "PARLOUR_DATABASE_URL",
        str,
        "sqlite+aiosqlite:///… or postgresql+asyncpg://…",
        "SQLite in the data directory",
    ),
    "model": Option(
        "PARLOUR_MODEL",
        str,
        "Default model: a configured name, a pulled model, a .gguf path, or `scripted`.",
        "the embedded SmolLM2-135M-Instruct",
    ),
    "config": Option("PARLOUR_CONFIG", Path, "TOML file declaring models."),
    "insecure": Option(
        "PARLOUR_INSECURE",
        boolean,
        "Allow listening on a non-loopback address without authentication.",
    ),
    "workers": Option(
        "PARLOUR_WORKERS", int, "Server processes sharing the port; more than 1 needs PostgreSQL."
    ),
    "max_body_bytes": Option("PARLOUR_MAX_BODY_BYTES", int, "Largest request body accepted."),
    "max_upload_bytes": Option(
        "PARLOUR_MAX_UPLOAD_BYTES", int, "Largest document upload accepted (admin API)."
    ),
    "max_message_chars": Option(
        "PARLOUR_MAX_MESSAGE_CHARS", int, "Longest message accepted, in characters."
    ),
    "history_cache_mb": Option(
        "PARLOUR_HISTORY_CACHE_MB", int, "Memory for recent conversations' messages."
    ),
    "allowed_hosts": Option(
        "PARLOUR_ALLOWED_HOSTS",
        _list,
        "Host names served without authentication besides loopback ones (comma-separated).",
    ),
    "cors_origins": Option(
        "PARLOUR_CORS_ORIGINS",
        _list,
        "Web origins allowed to call the API from a browser (comma-separated).",
    ),
    "heartbeat_seconds": Option(
        "PARLOUR_HEARTBEAT_SECONDS", float, "Seconds between heartbeats of idle kernel2 streams."
    ),
    "strict_models": Option(
        "PARLOUR_STRICT_MODELS",
        boolean,
        "Answer 404 for unknown model names instead of the default.",
    ),
    "llama_threads": Option(
        "PARLOUR_LLAMA_THREADS", int, "Threads of the embedded model.", "half the cores"
    ),
    "jwt_secret": Option("PARLOUR_JWT_SECRET", str, "HS256 secret that verifies JWTs."),
    "jwt_public_key": Option(
        "PARLOUR_JWT_PUBLIC_KEY", Path, "PEM public key that verifies RS256/ES256 JWTs."
    ),
    "jwt_issuer": Option("PARLOUR_JWT_ISSUER", str, "Required `iss` of JWTs."),
    "jwt_audience": Option("PARLOUR_JWT_AUDIENCE", str, "Required `aud` of JWTs."),
    "sessionless": Option(
        "PARLOUR_SESSIONLESS",
        lambda raw: raw.strip().lower(),
        "OpenAI requests without a session: `reject` (400) or `stateless`.",
    ),
    "session_from_user": Option(
        "PARLOUR_SESSION_FROM_USER", boolean, "Take the session from the OpenAI `user` field."
    ),
    "responses_truncation": Option(
        "PARLOUR_RESPONSES_TRUNCATION",
        str,
        "The Responses API's truncation when a request leaves it out: `auto` or `disabled`.",
    ),
    "log_format": Option("PARLOUR_LOG_FORMAT", str, "`text`, or `json` for one object per line."),
    "log_level": Option("PARLOUR_LOG_LEVEL", str, "Logging level."),
    "metrics": Option("PARLOUR_METRICS", boolean, "Serve /metrics and record generations."),
    "requests_per_minute": Option(
        "PARLOUR_REQUESTS_PER_MINUTE", int, "Requests per minute of every key (0: no limit)."
    ),
    "tokens_per_day": Option(
        "PARLOUR_TOKENS_PER_DAY", int, "Prompt and completion tokens per day of every key."
    ),
    "max_concurrent_per_owner": Option(
        "PARLOUR_MAX_CONCURRENT_PER_OWNER", int, "Generations one owner may run at once."
    ),
    "max_queue": Option(
        "PARLOUR_MAX_QUEUE", int, "Generations one process holds at once; beyond it, 503."
    ),
    "rate_limit_storage": Option(
        "PARLOUR_RATE_LIMIT_STORAGE",
        str,
        "A `limits` storage URI for the counters (e.g. redis://host:6379).",
        "memory on SQLite, the database on PostgreSQL",
    ),
}
