"""Upload handling: stage the bytes while hashing, validate with the loaders, then store and record.

Nothing is written to the store or the database unless validation passed; the caller commits.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.storage import ArtifactStore, UploadTooLarge

from . import loaders
from .inspect_model import inspect_in_subprocess
from .tables import DatasetArtifact, ModelArtifact


def dataset_limits(settings: Settings) -> loaders.DatasetLimits:
    return loaders.DatasetLimits(max_examples=settings.max_examples, max_features=settings.max_features,
                                 max_classes=settings.max_classes, max_uncompressed_bytes=settings.max_dataset_bytes)


def _problem(exc: loaders.ArtifactError) -> ProblemError:
    return ProblemError(exc.status, exc.slug, exc.detail)


def _head(source: BinaryIO) -> bytes:
    head = source.read(16)
    source.seek(0)
    return head


def create_model(*, session: Session, store: ArtifactStore, settings: Settings, tenant_id: str, source: BinaryIO,
                 filename: str, name: str | None, architecture: str | None) -> ModelArtifact:
    try:
        fmt = loaders.detect_model_format(filename, _head(source))
        with store.staged(source, settings.max_upload_bytes, suffix="." + fmt) as (path, sha, size):
            # conversion and the smoke forward pass run in a separate process under a time limit
            loaded = inspect_in_subprocess(path, fmt, architecture, settings.model_validation_timeout_seconds)
            store.commit(path, sha)
    except loaders.ArtifactError as exc:
        raise _problem(exc) from exc
    except UploadTooLarge as exc:
        raise ProblemError(413, "payload-too-large", str(exc)) from exc
    row = ModelArtifact(tenant_id=tenant_id, name=name or Path(filename or "model").name, format=fmt, sha256=sha,
                        size_bytes=size, num_parameters=loaded.num_parameters, input_shape=loaded.input_shape,
                        num_outputs=loaded.num_outputs, architecture=loaded.architecture)
    session.add(row)
    session.flush()
    return row


def create_dataset(*, session: Session, store: ArtifactStore, settings: Settings, tenant_id: str, source: BinaryIO,
                   filename: str, name: str | None) -> DatasetArtifact:
    try:
        fmt = loaders.detect_dataset_format(filename, _head(source))
        with store.staged(source, settings.max_upload_bytes, suffix="." + fmt) as (path, sha, size):
            try:
                loaded = loaders.load_dataset(path, fmt, dataset_limits(settings))
            except (loaders.ArtifactError, UploadTooLarge):
                raise
            except MemoryError as exc:
                raise loaders.ArtifactError("dataset-too-large", "the dataset does not fit in memory", 413) from exc
            except Exception as exc:  # anything else a hostile file provokes in the parsers is the file's fault
                raise loaders.ArtifactError("invalid-dataset", f"the file could not be read as a {fmt} dataset "
                                            f"({type(exc).__name__})") from exc
            store.commit(path, sha)
    except loaders.ArtifactError as exc:
        raise _problem(exc) from exc
    except UploadTooLarge as exc:
        raise ProblemError(413, "payload-too-large", str(exc)) from exc
    row = DatasetArtifact(tenant_id=tenant_id, name=name or Path(filename or "dataset").name, format=fmt, sha256=sha,
                          size_bytes=size, num_examples=loaded.num_examples, num_classes=loaded.num_classes,
                          input_shape=loaded.input_shape, label_counts=loaded.label_counts)
    session.add(row)
    session.flush()
    return row
