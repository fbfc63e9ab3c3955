"""Prometheus metrics: one Metrics object per app, with its own registry.

Requests, turns, tokens and database statements are counted as they happen; model and
session state is read when /metrics is scraped (and after each generation). With
`--workers N` the server sets PROMETHEUS_MULTIPROC_DIR before the workers start, so
every process writes its values to files there and any worker's /metrics adds them up.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from sqlalchemy import event

from ..store.queries import STATEMENT_TIMER
from .observe import Observer, Watch

if TYPE_CHECKING:
    from ..models import ModelRegistry
    from ..store.db import Database
    from ..turns.request import Generated

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)
STATEMENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: How a gauge's values from several processes are combined.
GaugeMode = Literal["all", "livesum"]
#: Where sessions' prompt state lives: a slot of the model's context, RAM or disk.
PLACES = ("slot", "ram", "disk")
#: Label values whose metrics are kept at hand before that cache starts over.
KEPT_LABELS = 1024


class ModelMetrics(NamedTuple):
    """One model's labelled turn metrics (prometheus_client's labels() costs a lookup
    under a lock on every call)."""

    turn_seconds: Any
    first_token: Any
    prompt_evaluated: Any
    prompt_reused: Any
    completion_tokens: Any


class Metrics(Observer):
    """Every metric parlour exports, registered in a registry of this app's own."""

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        self.models: ModelRegistry | None = None
        #: This process's generations running and waiting now (what the gauges hold).
        self.now_running = 0
        self.now_queued = 0
        self._request_metrics: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        self._model_metrics: dict[str, ModelMetrics] = {}
        self.requests = self._counter(
            "parlour_http_requests",
            "HTTP requests answered, by route template, dialect and status.",
            "route",
            "method",
            "dialect",
            "status",
        )
        self.request_seconds = self._histogram(
            "parlour_http_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response (streams included).",
            LATENCY_BUCKETS,
            "route",
            "dialect",
        )
        self._turn_metrics()
        self.statement_seconds = self._histogram(
            "parlour_db_statement_duration_seconds",
            "Seconds each statement of a turn's database transactions took.",
            STATEMENT_BUCKETS,
        )
        self.limited = self._counter(
            "parlour_rate_limited", "Requests refused with 429, by the limit they hit.", "limit"
        )
        self.rejected = self._counter(
            "parlour_admission_rejected", "Generations refused with 503 because the queue was full."
        )
        self._state_gauges()

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def _histogram(
        self, name: str, documentation: str, buckets: tuple[float, ...], *labels: str
    ) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def _gauge(self, name: str, documentation: str, *labels: str, mode: GaugeMode = "all") -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry, multiprocess_mode=mode)

    def _turn_metrics(self) -> None:
        self.first_token = self._histogram(
            "parlour_time_to_first_token_seconds",
            "Seconds from the start of a generation to its first text.",
            LATENCY_BUCKETS,
            "model",
        )
        self.turn_seconds = self._histogram(
            "parlour_turn_duration_seconds",
            "Seconds from the start of a generation (lock wait included) to its end.",
            LATENCY_BUCKETS,
            "model",
        )
        self.generations = self._counter(
            "parlour_generations",
            "Generations ended, by model and finish reason.",
            "model",
            "finish_reason",
        )
        self.prompt_evaluated = self._counter(
            "parlour_prompt_tokens_evaluated", "Prompt tokens the model evaluated.", "model"
        )
        self.prompt_reused = self._counter(
            "parlour_prompt_tokens_reused",
            "Prompt tokens not evaluated because the session's saved state held them.",
            "model",
        )
        self.completion_tokens = self._counter(
            "parlour_completion_tokens", "Tokens generated.", "model"
        )
        # Live processes' values added up: a dead worker's generations are not running.
        self.running = self._gauge(
            "parlour_generations_running", "Generations the backend is working on.", mode="livesum"
        )
        self.queued = self._gauge(
            "parlour_generations_queued",
            "Generations accepted but not yet generating (waiting for a lock or the model).",
            mode="livesum",
        )
        self.lock_wait = self._histogram(
            "parlour_turn_lock_wait_seconds",
            "Seconds a turn waited for its conversation's lock.",
            WAIT_BUCKETS,
        )

    def _state_gauges(self) -> None:
        # State, not events: each process reports its own, kept per process ("all").
        self.model_ready = self._gauge(
            "parlour_model_ready", "1 when the model is loaded and can generate.", "model"
        )
        self.model_failed = self._gauge(
            "parlour_model_failed", "1 when loading the model failed.", "model"
        )
        self.sessions = self._gauge(
            "parlour_sessions_resident",
            "Sessions whose prompt state is kept, by where: a context slot, RAM or disk.",
            "model",
            "where",
        )
        self.session_bytes = self._gauge(
            "parlour_session_state_bytes",
            "Bytes of saved session state, in RAM and on disk.",
            "model",
            "where",
        )

    @classmethod
    def from_env(cls) -> Metrics:
        """Metrics for this process, in multiprocess mode when the server set it up."""
        return cls(multiprocess_dir=os.environ.get(MULTIPROCESS_ENV) or None)

    def watch(self) -> Watch:
        """A watch that records one generation."""
        return _MetricsWatch(self)

    def observe_request(
        self, *, route: str, method: str, dialect: str, status: int, seconds: float
    ) -> None:
        """Count one answered HTTP request."""
        key = (route, method, dialect, status)
        labelled = self._request_metrics.get(key)
        if labelled is None:
            if len(self._request_metrics) >= KEPT_LABELS:
                self._request_metrics.clear()
            labelled = self._request_metrics[key] = (
                self.requests.labels(route, method, dialect, str(status)),
                self.request_seconds.labels(route, dialect),
            )
        labelled[0].inc()
        labelled[1].observe(seconds)

    def of_model(self, model: str) -> ModelMetrics:
        """The model's labelled turn metrics."""
        labelled = self._model_metrics.get(model)
        if labelled is None:
            if len(self._model_metrics) >= KEPT_LABELS:
                self._model_metrics.clear()
            labelled = self._model_metrics[model] = ModelMetrics(
                self.turn_seconds.labels(model),
                self.first_token.labels(model),
                self.prompt_evaluated.labels(model),
                self.prompt_reused.labels(model),
                self.completion_tokens.labels(model),
            )
        return labelled

    def watch_database(self, db: Database) -> None:
        """Time the statements every turn runs (queries.run), on SQLite and PostgreSQL.

        Not with SQLAlchemy's cursor events: registering any made every statement of a
        turn on PostgreSQL cost 0.2 ms more CPU per turn (measured, 8% of a turn).
        """
        timing = self.statement_seconds.observe

        def checkout(_dbapi: Any, record: Any, _proxy: Any) -> None:
            record.info[STATEMENT_TIMER] = timing

        event.listen(db.engine.sync_engine.pool, "checkout", checkout)
        if db.direct is not None:  # a turn's statements on a SQLite file skip SQLAlchemy
            db.direct.timed = timing

    def refresh(self) -> None:
        """Read model and session state into their gauges."""
        if self.models is None:
            return
        for loaded in self.models.models:
            name, backend = loaded.spec.name, loaded.backend
            self.model_ready.labels(name).set(1 if backend.ready else 0)
            self.model_failed.labels(name).set(1 if loaded.error else 0)
            for where, (count, size) in session_places(backend).items():
                self.sessions.labels(name, where).set(count)
                if where != "slot":
                    self.session_bytes.labels(name, where).set(size)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (of every worker)."""
        self.refresh()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)

    def close(self) -> None:
        """Drop this process's live gauges from the multiprocess totals."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


def session_places(backend: object) -> dict[str, tuple[int, int]]:
    """(sessions, bytes) by place for a backend that keeps session state (the embedded one)."""
    store = getattr(backend, "store", None)
    if store is None:
        return {}
    scheduler = getattr(backend, "_scheduler", None)
    slots = getattr(scheduler, "slots", ())
    # StateStore keeps its entries in two ordered dicts; only their sizes are read.
    return {
        "slot": (sum(1 for s in slots if s.session is not None), 0),
        "ram": (len(getattr(store, "_ram", ())), int(store.ram_used)),
        "disk": (len(getattr(store, "_disk", ())), int(store.disk_used)),
    }


class _MetricsWatch(Watch):
    """Records one generation: queue and running gauges, first token, turn time, tokens."""

    __slots__ = ("began", "first", "metrics", "result", "state")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.began = time.perf_counter()
        self.first: float | None = None
        self.result: Generated | None = None
        self.state = "queued"
        metrics.queued.inc()
        metrics.now_queued += 1

    def lock_waited(self, seconds: float) -> None:
        self.metrics.lock_wait.observe(seconds)

    def generating(self) -> None:
        if self.state == "queued":
            m = self.metrics
            m.queued.dec()
            m.running.inc()
            m.now_queued -= 1
            m.now_running += 1
            self.state = "running"

    def first_token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def generated(self, result: Generated) -> None:
        self.result = result

    def done(self, model: str | None) -> None:
        m = self.metrics
        if self.state == "done":
            return
        if self.state == "queued":
            m.queued.dec()
            m.now_queued -= 1
        elif self.state == "running":
            m.running.dec()
            m.now_running -= 1
        self.state = "done"
        label = model or "none"
        labelled = m.of_model(label)
        now = time.perf_counter()
        labelled.turn_seconds.observe(now - self.began)
        if self.first is not None:
            labelled.first_token.observe(self.first - self.began)
        result = self.result
        if m.multiprocess_dir is not None:
            m.refresh()  # other workers' scrapes read this process's state from its files
        if result is None:
            m.generations.labels(label, "not_started").inc()
            return
        m.generations.labels(label, result.finish_reason).inc()
        labelled.prompt_evaluated.inc(max(0, result.prompt_tokens - result.cached_tokens))
        labelled.prompt_reused.inc(result.cached_tokens)
        labelled.completion_tokens.inc(result.completion_tokens)
