from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.timeutil import as_utc


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_validator("created_at", mode="after", check_fields=False)
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)


class ExternalDataOut(BaseModel):
    name: str
    sha256: str
    size_bytes: int


class ModelOut(_Out):
    id: uuid.UUID
    name: str
    format: str
    num_parameters: int
    input_shape: list[int]
    num_outputs: int
    sha256: str
    size_bytes: int
    architecture: dict | None = None
    external_data: list[ExternalDataOut] = Field(default_factory=list, description=(
        "The ONNX external-data files uploaded with the model, by the file name its tensors refer to"))
    created_at: datetime


class DatasetOut(_Out):
    id: uuid.UUID
    name: str
    format: str
    num_examples: int
    num_classes: int
    input_shape: list[int]
    label_counts: list[int]
    sha256: str
    size_bytes: int
    created_at: datetime
