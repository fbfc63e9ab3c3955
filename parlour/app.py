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
from .api.errors import install_error_handlers
from .api.responses_run import ResponseRunner
from .api.security import install_auth
from .auth import Authenticator, Principal
from .engine import Engine
from .models import ModelRegistry, build_registry
from .settings import Settings
from .store.db import Database
from .store.notify import EventHub
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
        owner_id = await engine.owner_id(LOCAL_OWNER)
        app.state.settings = settings
        app.state.db = db
        app.state.models = registry
        app.state.engine = engine
        hub = EventHub(db.url, is_sqlite=db.is_sqlite)
        await hub.start()
        app.state.responses = ResponseRunner(engine=engine, db=db, hub=hub)
        app.state.local_principal = Principal(owner_id=owner_id, name=LOCAL_OWNER, admin=True)
        app.state.auth = Authenticator.from_settings(
            settings, db=db, local=app.state.local_principal
        )
        registry.start_loading()
        try:
            yield
        finally:
            await app.state.responses.close()
            await hub.close()
            await engine.close()
            await registry.close()
            await db.close()

    app = FastAPI(
        title="parlour",
        version=__version__,
        summary="A self-hosted chat server for language models with server-side memory.",
        lifespan=lifespan,
        # The chat page's router serves /docs from local files; ReDoc would need a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.error_shapes = [
        openai.openai_shape(),
        kernel2.kernel2_shape(),
        bots.bot_api_shape(),
        responses.responses_shape(),
    ]
    install_error_handlers(app)
    web.install(app)
    install_auth(app)
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


def app_from_env() -> FastAPI:
    """An app built from PARLOUR_* variables: the factory each `--workers` process runs."""
    app = create_app(Settings.from_env())
    freeze_startup_objects()
    return app


def freeze_startup_objects() -> None:
    """Take everything allocated so far (modules, the app) out of the garbage collector's
    full passes, which otherwise walk those ~120k objects each time and stall every
    request for tens of milliseconds; call once before serving."""
    gc.collect()
    gc.freeze()
