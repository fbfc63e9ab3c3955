"""create_app(settings): the app factory; its lifespan builds the store, models and engine."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import __version__
from .api import admin, bots, conversations, health, kernel2, openai
from .api.errors import install_error_handlers
from .api.middleware import GuardMiddleware, RequestContextMiddleware
from .api.security import install_auth
from .auth import Authenticator, Principal
from .engine import Engine
from .logging import configure as configure_logging
from .metrics import Metrics
from .models import ModelRegistry, build_registry
from .observe import Observers
from .ratelimit import Admission, RateLimiter, TokenMeter, open_storage
from .settings import Settings
from .store.db import Database
from .store.queries import LOCAL_OWNER

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, models: ModelRegistry | None = None) -> FastAPI:
    """Build the ASGI app; nothing is opened until its lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.resolved_database_url)
        await db.migrate()
        registry = models or build_registry(
            model=settings.model,
            config=settings.config,
            strict=settings.strict_models,
            threads=settings.llama_threads,
            state_dir=settings.data_dir / "state",
            cache_dir=settings.cache_dir,
        )
        engine = Engine(db=db, models=registry)
        engine.observer = TokenMeter()
        if metrics is not None:
            engine.observer = Observers(metrics, engine.observer)
            metrics.models = registry
            metrics.watch_database(db)
        app.state.limiter = RateLimiter(settings=settings, storage=open_storage(settings, db))
        owner_id = await engine.owner_id(LOCAL_OWNER)
        app.state.settings = settings
        app.state.db = db
        app.state.models = registry
        app.state.engine = engine
        app.state.local_principal = Principal(owner_id=owner_id, name=LOCAL_OWNER, admin=True)
        app.state.auth = Authenticator.from_settings(
            settings, db=db, local=app.state.local_principal
        )
        registry.start_loading()
        try:
            yield
        finally:
            await engine.close()
            await app.state.limiter.close()
            await registry.close()
            await db.close()
            if metrics is not None:
                metrics.close()

    app = FastAPI(
        title="parlour",
        version=__version__,
        summary="A self-hosted chat server for language models with server-side memory.",
        lifespan=lifespan,
    )
    app.state.error_shapes = [
        openai.openai_shape(),
        kernel2.kernel2_shape(),
        bots.bot_api_shape(),
    ]
    install_error_handlers(app)
    metrics = Metrics.from_env() if settings.metrics else None
    app.state.metrics = metrics
    app.state.admission = Admission(
        max_queue=settings.max_queue, max_per_owner=settings.max_concurrent_per_owner
    )
    # Middleware added first runs innermost: limits see the principal auth resolved, and
    # the request id wraps everything, auth refusals included.
    app.add_middleware(GuardMiddleware, admission=app.state.admission, metrics=metrics)
    install_auth(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(conversations.router)
    app.include_router(kernel2.router)
    app.include_router(bots.router)
    app.include_router(admin.router)
    app.include_router(admin.usage_router)
    return app


def app_from_env() -> FastAPI:
    """An app built from PARLOUR_* variables: the factory each `--workers` process runs."""
    settings = Settings.from_env()
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    app = create_app(settings)
    freeze_startup_objects()
    return app


def freeze_startup_objects() -> None:
    """Take everything allocated so far (modules, the app) out of the garbage collector's
    full passes, which otherwise walk those ~120k objects each time and stall every
    request for tens of milliseconds; call once before serving."""
    gc.collect()
    gc.freeze()
