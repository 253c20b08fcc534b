"""Shared FastAPI dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from .config import Settings, get_settings
from .db import get_session
from .storage import ArtifactStore

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_store(settings: SettingsDep) -> ArtifactStore:
    return ArtifactStore(settings.storage_dir)


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

# Tenancy: every query is scoped by a tenant id. Until API keys exist (issue 5) everyone is "default".
DEFAULT_TENANT = "default"


def get_tenant() -> str:
    return DEFAULT_TENANT


TenantDep = Annotated[str, Depends(get_tenant)]
