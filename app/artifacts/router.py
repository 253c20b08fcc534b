"""HTTP endpoints for model and dataset uploads (HTTP only; logic in service.py)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile

from app.auth import idempotency

from app.core.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from app.core.errors import PROBLEM_RESPONSES, not_found

from app.audits.quota import storage_left
from app.audits.service import delete_input

from . import repository, service
from .schemas import DatasetOut, ModelOut, listed_dataset

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
        'JSON naming a built-in architecture for .safetensors, e.g. {"type": "mlp", "input_size": 64, '
        '"hidden_sizes": [32], "num_classes": 10}'))] = None,
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


@router.get("/datasets", response_model=list[DatasetOut], tags=["datasets"])
def list_datasets(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=500)] = 100):
    return [listed_dataset(row) for row in repository.list_datasets(session, tenant, limit)]
