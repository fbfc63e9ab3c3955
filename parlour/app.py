"""create_app(settings): the app factory; its lifespan builds the store, models and engine."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import __version__
from .api import (
    admin,
    bots,
    conversations,
    conversations_openai,
    health,
    kernel2,
    openai,
    responses,
    web,
)
from .api.body import install_body_limit
from .api.browser import install_cors
from .api.errors import install_error_handlers
from .api.middleware import RequestContextMiddleware
from .api.responses_run import ResponseRunner
from .api.security import install_auth
from .api.shutdown import install_shutdown
from .api.url_text import install_url_text
from .auth import Authenticator, Principal
from .backends.registry import registry_for
from .files import private_dir
from .models import ModelRegistry
from .ops.logs import configure as configure_logging
from .ops.metrics import Metrics
from .ops.observe import Observers
from .ops.ratelimit import Admission, RateLimiter, RequestMeter, open_storage
from .settings import Settings
from .store.db import Database
from .store.notify import EventHub
from .store.queries import LOCAL_OWNER
from .turns.engine import Engine

log = logging.getLogger(__name__)


async def open_state(app: FastAPI, settings: Settings, models: ModelRegistry | None) -> Engine:
    """Open the store, the models and the engine, and put them on app.state."""
    private_dir(settings.data_dir)
    db = Database(settings.resolved_database_url)
    await db.migrate()
    registry = models or registry_for(settings)
    engine = Engine(
        db=db,
        models=registry,
        max_message_chars=settings.max_message_chars,
        history_chars=settings.history_cache_mb * 2**20,
    )
    engine.observer = RequestMeter()
    metrics: Metrics | None = app.state.metrics
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
    hub = EventHub(db.url, is_sqlite=db.is_sqlite)
    await hub.start()
    app.state.hub = hub
    app.state.responses = ResponseRunner(engine=engine, db=db, hub=hub)
    app.state.local_principal = Principal(owner_id=owner_id, name=LOCAL_OWNER, admin=True)
    app.state.auth = Authenticator.from_settings(settings, db=db, local=app.state.local_principal)
    registry.start_loading()
    return engine


async def close_state(app: FastAPI) -> None:
    """Stop running turns (keeping their partial replies) and close what open_state opened."""
    await app.state.responses.close()
    await app.state.hub.close()
    await app.state.engine.close()
    await app.state.limiter.close()
    await app.state.models.close()
    await app.state.db.close()
    if app.state.metrics is not None:
        app.state.metrics.close()


def create_app(settings: Settings, *, models: ModelRegistry | None = None) -> FastAPI:
    """Build the ASGI app; nothing is opened until its lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await open_state(app, settings, models)
        try:
            yield
        finally:
            await close_state(app)

    app = FastAPI(
        title="parlour",
        version=__version__,
        summary="A self-hosted chat server for language models with server-side memory.",
        lifespan=lifespan,
        # The chat page's router serves /docs from local files; ReDoc would need a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.dialects = [
        openai.router,
        kernel2.router,
        bots.router,
        responses.router,
        conversations_openai.router,
    ]
    install_guards(app, settings)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(conversations.router)
    app.include_router(responses.router)
    app.include_router(conversations_openai.router)
    app.include_router(kernel2.router)
    app.include_router(bots.router)
    app.include_router(admin.router)
    app.include_router(admin.usage_router)
    return app


def install_guards(app: FastAPI, settings: Settings) -> None:
    """What runs around every route: error shapes, auth, the body and URL limits, the
    browser rules of local mode, and the shutdown signal open streams watch."""
    install_error_handlers(app)
    install_shutdown(app)
    # The chat page's files are public (they need no token); it names them before the
    # auth guard is installed.
    web.install(app)
    metrics = Metrics.from_env() if settings.metrics else None
    app.state.metrics = metrics
    app.state.admission = Admission(
        max_queue=settings.max_queue, max_per_owner=settings.max_concurrent_per_owner
    )
    # Middleware added first runs innermost; the request id wraps everything, refusals
    # of the outer guards included. Limits run inside the routes (guard.install), after
    # auth has resolved the principal.
    install_auth(app)
    install_body_limit(app, settings)
    install_url_text(app)
    install_cors(app, settings)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)


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
