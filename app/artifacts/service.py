"""Upload handling: stage the bytes while hashing, validate with the loaders, then store and record.

Nothing is written to the store or the database unless validation passed; the caller commits.
"""

from __future__ import annotations

import math
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.storage import ArtifactStore, UploadTooLarge

from . import loaders
from .inspect_model import inspect_in_subprocess
from .tables import DatasetArtifact, ModelArtifact


def dataset_limits(settings: Settings) -> loaders.DatasetLimits:
    return loaders.DatasetLimits(max_examples=settings.max_examples, max_features=settings.max_features,
                                 max_classes=settings.max_classes, max_uncompressed_bytes=settings.max_dataset_bytes,
                                 max_columns=settings.max_table_columns)


def _unprintable(character: str) -> bool:
    """A control character, or a lone surrogate (what undecodable bytes become): not storable text."""
    code = ord(character)
    return code < 32 or code == 127 or 0xD800 <= code <= 0xDFFF


def display_name(name: str | None, filename: str | None, default: str) -> str:
    """The record's name: the `name` field, else the uploaded file's base name. A NUL (which PostgreSQL
    cannot store), another control character or text that is not valid UTF-8 in a given name is a 422;
    in a file name it is replaced, since the client may not control it."""
    if name is not None:
        if any(map(_unprintable, name)) or not name.strip():
            raise ProblemError(422, "invalid-name", "`name` must be non-empty printable UTF-8 text without control "
                               "characters")
        return name
    base = Path((filename or default).replace("\0", "")).name or default
    cleaned = "".join("\ufffd" if _unprintable(c) else c for c in base)
    return cleaned[:255]


def _problem(exc: loaders.ArtifactError) -> ProblemError:
    return ProblemError(exc.status, exc.slug, exc.detail, headers={"Retry-After": "5"} if exc.status == 503 else None)


def _head(source: BinaryIO) -> bytes:
    head = source.read(16)
    source.seek(0)
    return head


def _external_part_names(parts: list[tuple[str, BinaryIO]]) -> list[str]:
    names = [filename for filename, _ in parts]
    for filename in names:
        if not filename or filename != Path(filename).name or "\\" in filename or filename in (".", ".."):
            raise ProblemError(422, "external-data-name", f"external_data part file name {filename!r} must be a "
                               "bare file name (the `location` its tensors name), without directories")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProblemError(422, "external-data-duplicate", f"external_data parts {duplicates} were uploaded more "
                           "than once; send each file once")
    return names


def _upload_limit(settings: Settings, storage_left: int | None) -> int:
    return settings.max_upload_bytes if storage_left is None else min(settings.max_upload_bytes, storage_left)


def _too_large(exc: UploadTooLarge, settings: Settings, storage_left: int | None) -> ProblemError:
    """413: over the upload limit, or over what the tenant's storage quota has left (whichever binds)."""
    if storage_left is not None and storage_left < settings.max_upload_bytes:
        from app.audits.quota import quota_exceeded

        return quota_exceeded(settings, storage_left, None, 413, "this upload")
    return ProblemError(413, "payload-too-large", str(exc))


def create_model(*, session: Session, store: ArtifactStore, settings: Settings, tenant_id: str, source: BinaryIO,
                 filename: str, name: str | None, architecture: str | None,
                 external_parts: list[tuple[str, BinaryIO]] = (), storage_left: int | None = None) -> ModelArtifact:
    """`external_parts`: (file name, stream) of each external-data file an ONNX model refers to.
    `storage_left`: what the tenant's storage quota still allows (None: no quota)."""
    name = display_name(name, filename, "model")  # checked before any byte is staged
    names = _external_part_names(list(external_parts))
    try:
        fmt = loaders.detect_model_format(filename, _head(source))
        if names and fmt != "onnx":
            raise loaders.ArtifactError("external-data-not-onnx", "external_data parts belong to an ONNX model only")
        with ExitStack() as stack:
            limit = _upload_limit(settings, storage_left)
            path, sha, size = stack.enter_context(store.staged(source, limit, suffix="." + fmt))
            staged_parts, used = [], size  # the size limit holds for all parts together, like the body limit
            for part_name, part_source in external_parts:
                part = stack.enter_context(store.staged(part_source, limit - used))
                staged_parts.append((part_name, *part))
                used += part[2]
            # conversion and the smoke forward pass run in a separate process under a time limit
            loaded = inspect_in_subprocess(path, fmt, architecture, settings.model_validation_timeout_seconds,
                                           external={n: p for n, p, _, _ in staged_parts},
                                           memory_bytes=settings.model_validation_memory_bytes,
                                           concurrency=settings.max_concurrent_validations)
            store.commit(path, sha)
            for _, part_path, part_sha, _ in staged_parts:
                store.commit(part_path, part_sha)
    except loaders.ArtifactError as exc:
        raise _problem(exc) from exc
    except UploadTooLarge as exc:
        raise _too_large(exc, settings, storage_left) from exc
    row = ModelArtifact(tenant_id=tenant_id, name=name, format=fmt, sha256=sha,
                        size_bytes=size, num_parameters=loaded.num_parameters, input_shape=loaded.input_shape,
                        num_outputs=loaded.num_outputs, architecture=loaded.architecture, inputs=loaded.inputs,
                        external_data=[{"name": n, "sha256": h, "size_bytes": b} for n, _, h, b in staged_parts])
    session.add(row)
    session.flush()
    return row


def external_paths(store: ArtifactStore, model: ModelArtifact) -> dict[str, Path]:
    """The stored external-data files of a model, by the file name its tensors refer to."""
    return {part["name"]: store.path_for(part["sha256"]) for part in (model.external_data or [])}


DATASET_PARSE_WAIT_SECONDS = 10.0  # how long a request waits for a parsing slot before its 503
_parse_slots: dict[int, threading.BoundedSemaphore] = {}
_parse_slots_lock = threading.Lock()


@contextmanager
def dataset_parse_slot(settings: Settings, wait_seconds: float | None = None):
    """One of the process's max_concurrent_dataset_parses slots, for as long as a dataset is parsed: each
    parse may hold up to max_dataset_bytes, so the API's memory for parsing stays within their product
    however many uploads arrive together. None free within `wait_seconds`: 503 `dataset-parser-busy`."""
    concurrency = settings.max_concurrent_dataset_parses
    wait_seconds = DATASET_PARSE_WAIT_SECONDS if wait_seconds is None else wait_seconds
    with _parse_slots_lock:
        slot = _parse_slots.setdefault(concurrency, threading.BoundedSemaphore(concurrency))
    if not slot.acquire(timeout=wait_seconds):
        raise loaders.ArtifactError("dataset-parser-busy",
                                    f"{concurrency} datasets are already being parsed by this server "
                                    "(PBRF_MAX_CONCURRENT_DATASET_PARSES); retry shortly", status=503)
    try:
        yield
    finally:
        slot.release()


def load_uploaded_dataset(path: Path, fmt: str, settings: Settings,
                          wait_seconds: float | None = None) -> loaders.LoadedDataset:
    """Parse a staged dataset upload, in one of the process's parsing slots; whatever a hostile file
    provokes in the parsers is an ArtifactError."""
    try:
        with dataset_parse_slot(settings, wait_seconds):
            return loaders.load_dataset(path, fmt, dataset_limits(settings))
    except (loaders.ArtifactError, UploadTooLarge):
        raise
    except MemoryError as exc:
        raise loaders.ArtifactError("dataset-too-large", "the dataset does not fit in memory", 413) from exc
    except Exception as exc:  # anything else a hostile file provokes in the parsers is the file's fault
        raise loaders.ArtifactError("invalid-dataset", f"the file could not be read as a {fmt} dataset "
                                    f"({type(exc).__name__})") from exc


def create_dataset(*, session: Session, store: ArtifactStore, settings: Settings, tenant_id: str, source: BinaryIO,
                   filename: str, name: str | None, storage_left: int | None = None) -> DatasetArtifact:
    name = display_name(name, filename, "dataset")
    try:
        fmt = loaders.detect_dataset_format(filename, _head(source))
        with store.staged(source, _upload_limit(settings, storage_left), suffix="." + fmt) as (path, sha, size):
            loaded = load_uploaded_dataset(path, fmt, settings)
            store.commit(path, sha)
    except loaders.ArtifactError as exc:
        raise _problem(exc) from exc
    except UploadTooLarge as exc:
        raise _too_large(exc, settings, storage_left) from exc
    row = DatasetArtifact(tenant_id=tenant_id, name=name, format=fmt, sha256=sha,
                          size_bytes=size, num_examples=loaded.num_examples, num_classes=loaded.num_classes,
                          input_shape=loaded.input_shape, inputs=loaded.input_specs, label_counts=loaded.label_counts)
    session.add(row)
    session.flush()
    return row


def model_inputs(model: ModelArtifact) -> list[dict]:
    """The model's graph inputs; rows from before migration 0005 had exactly one float input."""
    return model.inputs or loaders.single_input_spec(model.input_shape)


def dataset_inputs(dataset: DatasetArtifact) -> list[dict]:
    """The dataset's input arrays; rows from before migration 0005 held one float32 array."""
    return dataset.inputs or loaders.single_input_spec(dataset.input_shape)


MAX_EXAMPLES_PER_REQUEST = 100  # indices one GET /v1/datasets/{id}/examples may name
MAX_EXAMPLE_VALUES = 1 << 20  # input values one such answer may carry (about 20 MB of JSON at most)


def parse_indices(text: str, num_examples: int) -> list[int]:
    """`indices` of GET .../examples: comma-separated example indices, at most MAX_EXAMPLES_PER_REQUEST
    (422 beyond, or when one is not a non-negative integer), each below num_examples (404 otherwise).
    Repeats are answered once; the order is kept."""
    parts = [part.strip() for part in text.split(",")]
    if not parts or any(not part.isascii() or not part.isdigit() or len(part) > 19 for part in parts):
        raise ProblemError(422, "validation-error", "`indices` must be comma-separated example indices "
                           "(non-negative integers), e.g. indices=3,17,42")
    indices = list(dict.fromkeys(int(part) for part in parts))
    if len(indices) > MAX_EXAMPLES_PER_REQUEST:
        raise ProblemError(422, "too-many-indices", f"{len(indices)} indices were asked for; at most "
                           f"{MAX_EXAMPLES_PER_REQUEST} per request: split them over several requests")
    outside = [i for i in indices if i >= num_examples]
    if outside:
        raise ProblemError(404, "example-not-found", f"the dataset has {num_examples} examples (indices "
                           f"0..{num_examples - 1}); no example {outside[0]}")
    return indices


def dataset_examples(store: ArtifactStore, settings: Settings, dataset: DatasetArtifact,
                     indices: list[int]) -> tuple[list[dict], dict[int, tuple[dict[str, np.ndarray], int]]]:
    """The dataset's input specs and, by example index, ({input name: values}, label) for `indices`
    (checked by parse_indices), in the dtypes the audits read. Only those rows are read from an .npz."""
    specs = dataset_inputs(dataset)
    per_example = sum(math.prod(spec["shape"]) for spec in specs)
    if per_example * len(indices) > MAX_EXAMPLE_VALUES:
        fit = max(1, MAX_EXAMPLE_VALUES // max(per_example, 1))
        raise ProblemError(422, "too-many-values", f"{len(indices)} examples of {per_example} values each exceed "
                           f"the {MAX_EXAMPLE_VALUES} values one answer may carry: ask for at most {fit} at a time")
    ordered = sorted(indices)
    try:
        arrays, labels = loaders.read_rows(store.path_for(dataset.sha256), dataset.format,
                                           [spec["name"] for spec in specs], ordered, dataset_limits(settings),
                                           whole=lambda: dataset_parse_slot(settings))  # CSV, Parquet: whole
    except loaders.ArtifactError as exc:
        raise _problem(exc) from exc
    rows = {index: ({name: array[k] for name, array in arrays.items()}, int(labels[k]))
            for k, index in enumerate(ordered)}
    return specs, rows
