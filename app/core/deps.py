"""Shared FastAPI dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .config import Settings, get_settings
from .db import get_session
from .errors import ProblemError
from .storage import ArtifactStore

async def settings_dependency() -> Settings:
    """The cached settings, as a coroutine: FastAPI runs a plain-def dependency in its threadpool, a
    thread handoff per request for a value that never changes."""
    return get_settings()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(settings_dependency)]


def get_store(settings: SettingsDep) -> ArtifactStore:
    return ArtifactStore(settings.storage_dir)


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

# Tenancy: every query is scoped by the tenant of the caller's API key. With no keys configured the
# server runs open and everyone is the "default" tenant (announced loudly at start).
DEFAULT_TENANT = "default"
bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer pbrf_...`")


CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def get_tenant(session: SessionDep, settings: SettingsDep, credentials: CredentialsDep) -> str:
    return resolve_tenant(session, settings, credentials)


def resolve_tenant(session: Session, settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> str:
    from app.auth import service as auth

    static = auth.static_keys(settings.api_keys)
    if credentials is not None and credentials.scheme.lower() == "bearer":
        tenant = auth.tenant_for_secret(session, credentials.credentials, static)
        if tenant is not None:
            return tenant
        raise ProblemError(401, "unauthorized", "the API key is not valid (unknown or revoked)",
                           headers={"WWW-Authenticate": "Bearer"})
    if auth.any_keys(session, static):
        raise ProblemError(401, "unauthorized", "an API key is required: send `Authorization: Bearer <key>`",
                           headers={"WWW-Authenticate": "Bearer"})
    return DEFAULT_TENANT


TenantDep = Annotated[str, Depends(get_tenant)]
