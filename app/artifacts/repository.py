"""Queries for models and datasets, always scoped by tenant."""

from __future__ import annotations

import uuid

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session, defer
from sqlalchemy.orm.attributes import set_committed_value

from .schemas import LISTED_LABEL_COUNTS
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
    """A page of datasets whose label_counts are loaded only where a list shows them (at most
    LISTED_LABEL_COUNTS classes): 500 datasets of 100k classes would read 100 MB of JSON for a page that
    drops it. The others' label_counts stay unloaded (touching one would load it)."""
    rows = list(session.scalars(select(DatasetArtifact).where(DatasetArtifact.tenant_id == tenant_id)
                                .options(defer(DatasetArtifact.label_counts))
                                .order_by(DatasetArtifact.created_at.desc()).limit(limit)))
    shown = {row.id: row for row in rows
             if row.num_classes <= LISTED_LABEL_COUNTS and "label_counts" in inspect(row).unloaded}
    if shown:
        found = session.execute(select(DatasetArtifact.id, DatasetArtifact.label_counts)
                                .where(DatasetArtifact.id.in_(list(shown))))
        for dataset_id, counts in found:
            set_committed_value(shown[dataset_id], "label_counts", counts)
    return rows
