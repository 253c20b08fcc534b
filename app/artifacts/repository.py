"""Queries for models and datasets, always scoped by tenant."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from .tables import DatasetArtifact, ModelArtifact


def get_model(session: Session, tenant_id: str, model_id: uuid.UUID) -> ModelArtifact | None:
    return session.scalar(select(ModelArtifact).where(ModelArtifact.id == model_id, ModelArtifact.tenant_id == tenant_id))


def get_dataset(session: Session, tenant_id: str, dataset_id: uuid.UUID) -> DatasetArtifact | None:
    return session.scalar(select(DatasetArtifact).where(DatasetArtifact.id == dataset_id,
                                                        DatasetArtifact.tenant_id == tenant_id))


def list_models(session: Session, tenant_id: str, limit: int) -> list[ModelArtifact]:
    return list(session.scalars(select(ModelArtifact).where(ModelArtifact.tenant_id == tenant_id)
                                .order_by(ModelArtifact.created_at.desc()).limit(limit)))


def list_datasets(session: Session, tenant_id: str, limit: int) -> list[DatasetArtifact]:
    return list(session.scalars(select(DatasetArtifact).where(DatasetArtifact.tenant_id == tenant_id)
                                .order_by(DatasetArtifact.created_at.desc()).limit(limit)))
