"""Uploaded models and datasets: metadata rows; the bytes live in the artifact store under sha256."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base


class ModelArtifact(Base):
    __tablename__ = "model"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    input_shape: Mapped[list] = mapped_column(JSON)
    num_outputs: Mapped[int] = mapped_column(Integer)
    architecture: Mapped[dict | None] = mapped_column(JSON)
    # ONNX external-data files: [{name (the tensors' location), sha256, size_bytes}], stored like the model
    external_data: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    # graph inputs [{name, dtype, shape, vocab_size?}] in the order the model takes them (null: before 0005,
    # one float32 input of input_shape)
    inputs: Mapped[list | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DatasetArtifact(Base):
    __tablename__ = "dataset"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_examples: Mapped[int] = mapped_column(BigInteger)
    num_classes: Mapped[int] = mapped_column(Integer)
    input_shape: Mapped[list] = mapped_column(JSON)
    # input arrays [{name, dtype, shape, range?}] (null: before 0005, one float32 array of input_shape)
    inputs: Mapped[list | None] = mapped_column(JSON)
    label_counts: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
