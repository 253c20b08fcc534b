"""`Idempotency-Key` on POST endpoints: a retried request returns the first result instead of a duplicate.

The first response is stored with a hash of the request in the same transaction as the object it
created; a retry with the same key and the same request replays it (header `Idempotency-Replayed`),
the same key with a different request is a 422. Concurrent first requests race on the primary key:
the loser rolls back and replays the winner.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, BinaryIO

from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import ProblemError

from .tables import IdempotencyRecord


def hash_json(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def hash_upload(source: BinaryIO, fields: dict) -> str:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    while chunk := source.read(1024 * 1024):
        digest.update(chunk)
    source.seek(0)
    return digest.hexdigest()


def replay(session: Session, tenant_id: str, endpoint: str, key: str, request_sha256: str) -> JSONResponse | None:
    record = session.scalar(select(IdempotencyRecord).where(
        IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.endpoint == endpoint, IdempotencyRecord.key == key))
    if record is None:
        return None
    if record.request_sha256 != request_sha256:
        raise ProblemError(422, "idempotency-key-reused",
                           "this Idempotency-Key was already used with a different request; use a new key")
    headers = {"Idempotency-Replayed": "true"}
    if isinstance(record.response, dict) and "id" in record.response and not _still_exists(session, endpoint,
                                                                                             record.response["id"]):
        raise ProblemError(410, "idempotency-replay-deleted",
                           f"this Idempotency-Key created {record.response['id']}, which has since been deleted; "
                           "send the request with a new key to create it again")
    if isinstance(record.response, dict) and "id" in record.response:
        headers["Location"] = f"/v1/{endpoint.split('/')[-1]}/{record.response['id']}"
    return JSONResponse(record.response, status_code=record.status_code, headers=headers)


def _still_exists(session: Session, endpoint: str, object_id: str) -> bool:
    """Whether the object a first response named is still there (a replay must not hand out a dead id)."""
    import uuid

    from app.artifacts.tables import DatasetArtifact, ModelArtifact
    from app.audits.tables import Audit

    table = {"POST /v1/models": ModelArtifact, "POST /v1/datasets": DatasetArtifact, "POST /v1/audits": Audit}.get(endpoint)
    return table is None or session.get(table, uuid.UUID(str(object_id))) is not None


def remember(session: Session, tenant_id: str, endpoint: str, key: str, request_sha256: str, status_code: int,
             response: dict) -> None:
    session.add(IdempotencyRecord(tenant_id=tenant_id, endpoint=endpoint, key=key, request_sha256=request_sha256,
                                  status_code=status_code, response=response))


def create_once(session: Session, tenant_id: str, endpoint: str, key: str | None, request_sha256: str,
                create: Callable[[], Any], out_model, status_code: int) -> tuple[JSONResponse | dict, Any]:
    """Run `create` and commit, once per Idempotency-Key (always, without one).

    Returns (the response, the new row), or (the replayed first response, None) for a retry or for the
    loser of a race between two first requests."""
    if key:
        previous = replay(session, tenant_id, endpoint, key, request_sha256)
        if previous is not None:
            return previous, None
    row = create()
    body = out_model.model_validate(row).model_dump(mode="json")
    if key:
        remember(session, tenant_id, endpoint, key, request_sha256, status_code, body)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        previous = replay(session, tenant_id, endpoint, key, request_sha256) if key else None
        if previous is None:
            raise
        return previous, None
    return body, row
