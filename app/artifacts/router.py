"""HTTP endpoints for model and dataset uploads (HTTP only; logic in service.py)."""

from __future__ import annotations

import uuid
from typing import Annotated

import csv
import io
import json

import numpy as np
from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile
from fastapi.responses import StreamingResponse

from app.auth import idempotency

from app.core.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from app.core.errors import PROBLEM_RESPONSES, not_found

from app.audits import review
from app.audits.quota import storage_left
from app.audits.schemas import LabelChanges
from app.audits.service import delete_input

from . import repository, service
from .schemas import DatasetOut, ExamplesOut, ModelOut, listed_dataset

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255, description=(
    "Retry-safe creation: a repeated request with the same key returns the first result"))]


def _create_idempotently(session, tenant, endpoint, key, request_hash, create, out_model, response):
    result, row = idempotency.create_once(session, tenant, endpoint, key, request_hash, create, out_model, 201)
    if row is not None:
        response.headers["Location"] = f"/v1/{endpoint.split('/')[-1]}/{row.id}"
    return result


@router.post("/models", status_code=201, response_model=ModelOut, tags=["models"],
             summary="Upload a trained classifier (ONNX, or safetensors weights of a built-in architecture)")
def upload_model(
    session: SessionDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep, response: Response,
    file: Annotated[UploadFile, File(description="A .onnx model, or .safetensors weights")],
    name: Annotated[str | None, Form(max_length=255)] = None,
    architecture: Annotated[str | None, Form(max_length=10_000, description=(
        'With .safetensors weights: a JSON text (schema: Architecture) naming a built-in architecture and its sizes, '
        'e.g. {"type": "mlp", "input_size": 64, "hidden_sizes": [32], "num_classes": 10}'),
        json_schema_extra={"contentMediaType": "application/json",
                           "contentSchema": {"$ref": "#/components/schemas/Architecture"}})] = None,
    external_data: Annotated[list[UploadFile] | None, File(description=(
        "The external-data file(s) of an ONNX model (torch.onnx.export writes model.onnx.data beside model.onnx); "
        "each part's file name must be the `location` its tensors name"))] = None,
    idempotency_key: IdempotencyKey = None,
):
    parts = [(part.filename or "", part.file) for part in external_data or []]
    request_hash = ""
    if idempotency_key:
        request_hash = idempotency.hash_upload(file.file, {"filename": file.filename, "name": name,
                                                           "architecture": architecture,
                                                           "external_data": [n for n, _ in parts]})
        for _, part in parts:  # the parts' bytes are part of the request too
            request_hash = idempotency.hash_upload(part, {"previous": request_hash})
    return _create_idempotently(
        session, tenant, "POST /v1/models", idempotency_key, request_hash,
        lambda: service.create_model(session=session, store=store, settings=settings, tenant_id=tenant,
                                     source=file.file, filename=file.filename or "", name=name, architecture=architecture,
                                     external_parts=parts, storage_left=storage_left(session, settings, tenant)),
        ModelOut, response)


def _owned_or_404(session, tenant: str, kind: str, object_id: uuid.UUID):
    lookup = repository.get_model if kind == "model" else repository.get_dataset
    row = lookup(session, tenant, object_id)
    if row is None:
        raise not_found(kind, object_id)
    return row


@router.get("/models/{model_id}", response_model=ModelOut, tags=["models"])
def get_model(model_id: uuid.UUID, session: SessionDep, tenant: TenantDep):
    return _owned_or_404(session, tenant, "model", model_id)


IN_USE_RESPONSES = {409: PROBLEM_RESPONSES[400] | {"description": "A queued or running audit uses it"}}


@router.delete("/models/{model_id}", status_code=204, tags=["models"], responses=IN_USE_RESPONSES,
               summary="Delete a model and the finished audits made from it")
def delete_model(model_id: uuid.UUID, session: SessionDep, tenant: TenantDep):
    delete_input(session, tenant, _owned_or_404(session, tenant, "model", model_id), "model")
    return Response(status_code=204)


@router.delete("/datasets/{dataset_id}", status_code=204, tags=["datasets"], responses=IN_USE_RESPONSES,
               summary="Delete a dataset and the finished audits made from it")
def delete_dataset(dataset_id: uuid.UUID, session: SessionDep, tenant: TenantDep):
    delete_input(session, tenant, _owned_or_404(session, tenant, "dataset", dataset_id), "dataset")
    return Response(status_code=204)


@router.get("/models", response_model=list[ModelOut], tags=["models"])
def list_models(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=500)] = 100):
    return repository.list_models(session, tenant, limit)


@router.post("/datasets", status_code=201, response_model=DatasetOut, tags=["datasets"],
             summary="Upload a labelled training set (.npz with `inputs` and `labels`, or .csv / .parquet with a `label` column)")
def upload_dataset(
    session: SessionDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep, response: Response,
    file: Annotated[UploadFile, File(description=".npz with arrays `inputs` (float) and `labels` (int), or .csv")],
    name: Annotated[str | None, Form(max_length=255)] = None,
    idempotency_key: IdempotencyKey = None,
):
    request_hash = idempotency.hash_upload(file.file, {"filename": file.filename, "name": name}) \
        if idempotency_key else ""
    return _create_idempotently(
        session, tenant, "POST /v1/datasets", idempotency_key, request_hash,
        lambda: service.create_dataset(session=session, store=store, settings=settings, tenant_id=tenant,
                                       source=file.file, filename=file.filename or "", name=name,
                                       storage_left=storage_left(session, settings, tenant)),
        DatasetOut, response)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, tags=["datasets"])
def get_dataset(dataset_id: uuid.UUID, session: SessionDep, tenant: TenantDep):
    return _owned_or_404(session, tenant, "dataset", dataset_id)


LABELS_RESPONSES = {200: {"description": (
    "With Accept: text/csv, CSV `index,label,original_label` for every example; with Accept: application/json, "
    "the changes only; otherwise an .npz (no pickle) with int64 arrays `labels` and `original_labels`. Every "
    "form carries X-Changed-Examples: the number of labels the corrections change"),
    "headers": {"X-Changed-Examples": {"schema": {"type": "integer"}, "description": "Labels changed by corrections"}},
    "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.get("/datasets/{dataset_id}/labels", response_model=LabelChanges, tags=["datasets", "review"],
            responses=LABELS_RESPONSES,
            summary="The dataset's labels, with corrected=true the tenant's accepted corrections (mislabeled verdicts) "
                    "applied: .npz, CSV (Accept: text/csv) or the list of changes (Accept: application/json)")
def dataset_labels(dataset_id: uuid.UUID, session: SessionDep, store: StoreDep, settings: SettingsDep,
                   tenant: TenantDep, corrected: Annotated[bool, Query(description=(
                       "Apply the accepted corrections (false: the labels as uploaded)"))] = False,
                   accept: Annotated[str | None, Header()] = None):
    dataset = _owned_or_404(session, tenant, "dataset", dataset_id)
    found = review.dataset_labels(session, store, settings, dataset, corrected)
    headers = {"X-Changed-Examples": str(len(found.changes))}
    if accept and "text/csv" in accept:
        def rows():  # in blocks: a dataset may have millions of examples
            for start in range(0, len(found.labels), 65536):
                buffer = io.StringIO()
                writer = csv.writer(buffer)
                if start == 0:
                    writer.writerow(["index", "label", "original_label"])
                stop = min(start + 65536, len(found.labels))
                writer.writerows(zip(range(start, stop), found.labels[start:stop].tolist(),
                                     found.original[start:stop].tolist()))
                yield buffer.getvalue()

        return StreamingResponse(rows(), media_type="text/csv", headers=headers | {
            "Content-Disposition": f'attachment; filename="dataset-{dataset.id}-labels.csv"'})
    if accept and "application/json" in accept:
        body = LabelChanges(num_examples=len(found.labels), corrected=corrected, changes=found.changes)
        return Response(body.model_dump_json(), media_type="application/json", headers=headers)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=found.labels, original_labels=found.original)
    return Response(buffer.getvalue(), media_type="application/octet-stream", headers=headers | {
        "Content-Disposition": f'attachment; filename="dataset-{dataset.id}-labels.npz"'})


EXAMPLES_RESPONSES = {404: PROBLEM_RESPONSES[404] | {"description": (
    "No such dataset for this tenant (`not-found`), or an index at or past its number of examples "
    "(`example-not-found`)")}, 422: PROBLEM_RESPONSES[422] | {"description": (
    "`indices` is not a list of non-negative integers, names more than 100 examples (`too-many-indices`), "
    "or asks for more than 1,048,576 values in all (`too-many-values`)")}}


@router.get("/datasets/{dataset_id}/examples", response_model=ExamplesOut, tags=["datasets", "review"],
            responses=EXAMPLES_RESPONSES,
            summary="Some examples' input values and labels, by index (at most 100 per request), to look at them")
def dataset_examples(dataset_id: uuid.UUID, session: SessionDep, store: StoreDep, settings: SettingsDep,
                     tenant: TenantDep, indices: Annotated[str, Query(max_length=2200, description=(
                         "Comma-separated example indices, e.g. `3,17,42` (at most 100)"))]):
    dataset = _owned_or_404(session, tenant, "dataset", dataset_id)
    wanted = service.parse_indices(indices, dataset.num_examples)
    session.close()  # reading the rows needs no database connection
    specs, rows = service.dataset_examples(store, settings, dataset, wanted)
    body = {"dataset_id": str(dataset.id), "num_examples": dataset.num_examples,
            "inputs": [{"name": s["name"], "dtype": s["dtype"], "shape": list(s["shape"])} for s in specs],
            "examples": [{"index": i, "label": rows[i][1],
                          "inputs": {name: values.reshape(-1).tolist() for name, values in rows[i][0].items()}}
                         for i in wanted]}
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


@router.get("/datasets", response_model=list[DatasetOut], tags=["datasets"])
def list_datasets(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=500)] = 100):
    return [listed_dataset(row) for row in repository.list_datasets(session, tenant, limit)]
