from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.timeutil import as_utc


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_validator("inputs", mode="before", check_fields=False)
    @classmethod
    def _single_float_input_before_0005(cls, value, info):
        # rows stored before migration 0005 took (held) exactly one float32 input of input_shape
        if value is None and "input_shape" in info.data:
            return [{"name": "inputs", "dtype": "float32", "shape": info.data["input_shape"]}]
        return value

    @field_validator("created_at", mode="after", check_fields=False)
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)


class ExternalDataOut(BaseModel):
    name: str
    sha256: str
    size_bytes: int


class InputOut(BaseModel):
    name: str = Field(description="graph input name (a single-input dataset's array is `inputs`)")
    dtype: str = Field(description="float32, int64, int32, bool, ...")
    shape: list[int] = Field(description="the shape of one example (after the batch axis)")
    vocab_size: int | None = Field(None, description="model inputs that index an embedding table: ids must lie in "
                                   "0..vocab_size-1")
    range: list[int] | None = Field(None, description="integer dataset arrays: [smallest, largest] value")


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
    inputs: list[InputOut] = Field(default_factory=list, description=(
        "What the model takes, in order; a dataset for it holds one array per input (one array `inputs` when the "
        "model has a single input)"))
    created_at: datetime


class DatasetOut(_Out):
    id: uuid.UUID
    name: str
    format: str
    num_examples: int
    num_classes: int
    input_shape: list[int]
    inputs: list[InputOut] = Field(default_factory=list, description="the dataset's input arrays")
    label_counts: list[int] | None = Field(description=(
        "examples per label 0..num_classes-1; in lists only for datasets of at most "
        "1000 classes (null otherwise, so that a page stays small: GET the dataset for them)"))
    sha256: str
    size_bytes: int
    created_at: datetime


LISTED_LABEL_COUNTS = 1000  # a listed dataset carries at most this many label counts


def listed_dataset(row) -> DatasetOut:
    """A dataset as one item of a list: without label counts when there are more than 1000 of them
    (100k classes x 500 items made one page 100 MB). Their label_counts are not read at all (see
    repository.list_datasets, which leaves them unloaded)."""
    values = {name: getattr(row, name) for name in DatasetOut.model_fields if name != "label_counts"}
    values["label_counts"] = row.label_counts if row.num_classes <= LISTED_LABEL_COUNTS else None
    return DatasetOut.model_validate(values)



class ExampleOut(BaseModel):
    index: int = Field(description="Position of the example in the dataset")
    label: int = Field(description="Its label as uploaded")
    inputs: dict[str, list[float] | list[int]] = Field(description=(
        "Per input name (see `inputs` of the answer for dtype and shape): the example's values, flattened in "
        "row-major (C) order"))


class ExamplesOut(BaseModel):
    dataset_id: uuid.UUID
    num_examples: int
    inputs: list[InputOut] = Field(description="Name, dtype (int64 or float32, as audited) and shape of one example "
                                   "of each input array")
    examples: list[ExampleOut] = Field(description="In the order the indices were asked for (each index once)")
