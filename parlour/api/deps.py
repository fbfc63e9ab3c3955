"""Dependencies shared by every dialect: the app's state and who a request acts for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from ..auth import Authenticator
from ..auth import Principal as Principal
from ..errors import Forbidden
from ..models import ModelRegistry
from ..settings import Settings
from ..store.db import Database
from ..turns.engine import Engine


async def get_engine(request: Request) -> Engine:
    """The app's engine."""
    # These are async only so FastAPI calls them in place instead of in its thread pool.
    engine: Engine = request.app.state.engine
    return engine


async def get_models(request: Request) -> ModelRegistry:
    """The app's model registry."""
    models: ModelRegistry = request.app.state.models
    return models


async def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_principal(request: Request) -> Principal:
    """The owner a request acts for, as the auth guard resolved it from the bearer token."""
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        return principal
    # Reached only on paths the guard lets through; resolve the same way it would.
    auth: Authenticator = request.app.state.auth
    resolved = await auth.principal(request.headers.get("authorization"))
    request.state.principal = resolved
    return resolved


EngineDep = Annotated[Engine, Depends(get_engine)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_admin(principal: PrincipalDep) -> Principal:
    """The principal, if it may use the admin API (an `--admin` key, or the local owner)."""
    if not principal.admin:
        raise Forbidden(
            "This needs an admin API key; create one with `parlour key create --owner NAME "
            "--admin`."
        )
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]


async def read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A database session for reads (no write lock on SQLite), in a transaction."""
    db: Database = request.app.state.db
    async with db.read() as session, session.begin():
        yield session


async def write_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A database session in a write transaction, committed before the response is sent."""
    db: Database = request.app.state.db
    async with db.session() as session, session.begin():
        yield session


ReadSession = Annotated[AsyncSession, Depends(read_session, scope="function")]
WriteSession = Annotated[AsyncSession, Depends(write_session, scope="function")]
