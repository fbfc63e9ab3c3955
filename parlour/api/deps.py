"""Dependencies shared by every dialect: the app's state and who a request acts for."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import Request

from ..engine import Engine
from ..models import ModelRegistry
from ..settings import Settings


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    owner_id: uuid.UUID
    name: str
    admin: bool = False


def get_engine(request: Request) -> Engine:
    """The app's engine."""
    engine: Engine = request.app.state.engine
    return engine


def get_models(request: Request) -> ModelRegistry:
    """The app's model registry."""
    models: ModelRegistry = request.app.state.models
    return models


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_principal(request: Request) -> Principal:
    """The owner a request acts for: without configured auth, the local owner."""
    principal: Principal = request.app.state.local_principal
    return principal


EngineDep = Annotated[Engine, Depends(get_engine)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
