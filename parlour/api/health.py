"""GET /health: readiness of the server and its default model; never needs auth."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse

from .deps import ModelsDep

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    summary="Readiness probe: 200 once the default model is loaded, else 503.",
    responses={503: {"description": "The default model is not loaded yet."}},
)
async def health(models: ModelsDep) -> JSONResponse:
    """Report whether the default model can answer."""
    default = models.default
    body: dict[str, Any] = {
        "status": "ok" if models.ready else ("error" if default.error else "loading"),
        "ready": models.ready,
        "model": default.spec.name,
        "backend": default.spec.backend,
    }
    if default.error:
        body["error"] = default.error
    return JSONResponse(body, status_code=200 if models.ready else 503)
