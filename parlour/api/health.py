"""Health probes (never need auth) and the Prometheus scrape endpoint (admin only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import NotFound
from ..models import ModelRegistry
from ..ops.metrics import CONTENT_TYPE, Metrics
from ..ops.ratelimit import Admission
from .deps import AdminDep, ModelsDep

router = APIRouter(tags=["health"])

#: Paths answered without a token.
HEALTH_PATHS = frozenset({"/health", "/health/live", "/health/ready"})


def _queue(request: Request) -> dict[str, Any]:
    admission: Admission | None = getattr(request.app.state, "admission", None)
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    queue: dict[str, Any] = {
        "in_flight": admission.in_flight if admission is not None else 0,
        "limit": admission.max_queue if admission is not None else None,
    }
    if metrics is not None:
        queue["running"] = metrics.now_running
        queue["queued"] = metrics.now_queued
    return queue


def _full(request: Request) -> bool:
    admission: Admission | None = getattr(request.app.state, "admission", None)
    return bool(
        admission is not None
        and admission.max_queue is not None
        and admission.in_flight >= admission.max_queue
    )


def _model_body(models: ModelRegistry) -> dict[str, Any]:
    default = models.default
    body: dict[str, Any] = {
        "status": "ok" if models.ready else ("error" if default.error else "loading"),
        "ready": models.ready,
        "model": default.spec.name,
        "backend": default.spec.backend,
    }
    if default.error:
        body["error"] = default.error
    return body


@router.get(
    "/health",
    summary="Readiness probe: 200 once the default model is loaded, else 503.",
    responses={503: {"description": "The default model is not loaded yet."}},
)
async def health(request: Request, models: ModelsDep) -> JSONResponse:
    """Report whether the default model can answer, and the generation queue."""
    body = _model_body(models)
    body["queue"] = _queue(request)
    return JSONResponse(body, status_code=200 if models.ready else 503)


@router.get("/health/live", summary="Liveness probe: 200 while the process serves requests.")
async def live() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@router.get(
    "/health/ready",
    summary="Readiness probe for orchestrators: 200 when the default model is loaded and the "
    "generation queue has room, else 503.",
    responses={503: {"description": "The model is not loaded, or the queue is full."}},
)
async def ready(request: Request, models: ModelsDep) -> JSONResponse:
    """Whether this process should get new traffic now."""
    body = _model_body(models)
    body["queue"] = _queue(request)
    full = _full(request)
    body["ready"] = models.ready and not full
    if models.ready and full:
        body["status"] = "busy"
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format); needs an admin key when auth is configured.",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request, _admin: AdminDep) -> Response:
    """Every metric of this server (all workers' with --workers)."""
    found: Metrics | None = getattr(request.app.state, "metrics", None)
    if found is None:
        raise NotFound("Metrics are off (PARLOUR_METRICS=false).")
    return Response(found.render(), media_type=CONTENT_TYPE)
