"""One Settings object: defaults, then PARLOUR_* environment variables, then explicit values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


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
    #: Seconds without a token after which kernel2 streams send a `: heartbeat` comment.
    heartbeat_seconds: float = 10.0
    strict_models: bool = False
    llama_threads: int | None = None
    jwt_secret: str | None = None
    jwt_public_key: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
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
        for name, (var, _parse) in ENV_VARS.items():
            value = getattr(self, name)
            if value is None:
                continue
            env[var] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @property
    def cache_dir(self) -> Path:
        """Derived files (converted model weights), rebuilt when missing; safe to delete."""
        return self.data_dir / "cache"

    @property
    def is_loopback(self) -> bool:
        """True when the server only listens on the local machine."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    @property
    def auth_configured(self) -> bool:
        """True when a JWT key is set; API keys also configure auth, but live in the database."""
        return bool(self.jwt_secret or self.jwt_public_key)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from PARLOUR_* variables, with explicit overrides winning."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, (var, parse) in ENV_VARS.items():
            raw = source.get(var)
            if raw is not None and raw != "":
                values[name] = parse(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _bool(raw: str) -> bool:
    return raw.strip().lower() in {"1", "true", "yes", "on"}


ENV_VARS: dict[str, tuple[str, Any]] = {
    "host": ("PARLOUR_HOST", str),
    "port": ("PARLOUR_PORT", int),
    "data_dir": ("PARLOUR_DATA_DIR", Path),
    "database_url": ("PARLOUR_DATABASE_URL", str),
    "model": ("PARLOUR_MODEL", str),
    "config": ("PARLOUR_CONFIG", Path),
    "insecure": ("PARLOUR_INSECURE", _bool),
    "workers": ("PARLOUR_WORKERS", int),
    "max_body_bytes": ("PARLOUR_MAX_BODY_BYTES", int),
    "heartbeat_seconds": ("PARLOUR_HEARTBEAT_SECONDS", float),
    "strict_models": ("PARLOUR_STRICT_MODELS", _bool),
    "llama_threads": ("PARLOUR_LLAMA_THREADS", int),
    "jwt_secret": ("PARLOUR_JWT_SECRET", str),
    "jwt_public_key": ("PARLOUR_JWT_PUBLIC_KEY", Path),
    "jwt_issuer": ("PARLOUR_JWT_ISSUER", str),
    "jwt_audience": ("PARLOUR_JWT_AUDIENCE", str),
    "log_format": ("PARLOUR_LOG_FORMAT", str),
    "log_level": ("PARLOUR_LOG_LEVEL", str),
    "metrics": ("PARLOUR_METRICS", _bool),
    "requests_per_minute": ("PARLOUR_REQUESTS_PER_MINUTE", int),
    "tokens_per_day": ("PARLOUR_TOKENS_PER_DAY", int),
    "max_concurrent_per_owner": ("PARLOUR_MAX_CONCURRENT_PER_OWNER", int),
    "max_queue": ("PARLOUR_MAX_QUEUE", int),
    "rate_limit_storage": ("PARLOUR_RATE_LIMIT_STORAGE", str),
}
