"""Train-to-query attributions of a succeeded audit: create (validate the query set, store it, queue
the job), read results. The job itself runs on a worker (worker/jobs.py: run_attribution_job) with the
audit's stored curvature: no refit."""

from __future__ import annotations

import uuid
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.artifacts import loaders
from app.artifacts import repository as artifacts
from app.artifacts.service import _head, _problem, _too_large, _upload_limit, load_uploaded_dataset, model_inputs
from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.storage import ArtifactStore, UploadTooLarge
from app.core.timeutil import utcnow

from .quota import storage_left
from .service import require_succeeded
from .tables import Attribution, Audit

ACTIVE = ("queued", "running")
MAX_QUERIES = 10_000  # queries per attribution: each takes (parameters) floats while its chunk is scored


def create_attribution(*, session: Session, store: ArtifactStore, settings: Settings, tenant_id: str, audit: Audit,
                       source: BinaryIO, filename: str, top_k: int) -> Attribution:
    require_succeeded(audit, needs="attributions can use the curvature it stores")
    if not audit.curvature_sha256 or not store.path_for(audit.curvature_sha256).exists():
        raise ProblemError(422, "audit-without-curvature", f"this audit ({audit.method}) stored no curvature to "
                           "attribute with: audits with method ekfac, kfac, diagonal, exact or lanczos (or loo on one "
                           "of them) store theirs; run one of those on this model and dataset first")
    model = artifacts.get_model(session, tenant_id, audit.model_id)
    active = session.scalar(select(func.count()).select_from(Attribution).where(
        Attribution.tenant_id == tenant_id, Attribution.status.in_(ACTIVE)))
    if active >= settings.max_active_audits_per_tenant:
        raise ProblemError(429, "too-many-active-attributions",
                           f"this tenant already has {active} queued or running attributions (the limit is "
                           f"{settings.max_active_audits_per_tenant})", headers={"Retry-After": "30"})
    left = storage_left(session, settings, tenant_id)
    try:
        fmt = loaders.detect_dataset_format(filename, _head(source))
        with store.staged(source, _upload_limit(settings, left), suffix="." + fmt) as (path, sha, size):
            queries = load_uploaded_dataset(path, fmt, settings)
            if queries.num_examples > MAX_QUERIES:
                raise loaders.ArtifactError("too-many-queries", f"{queries.num_examples} query examples; at most "
                                            f"{MAX_QUERIES} per attribution")
            loaders.match_inputs(model_inputs(model), queries.input_specs)
            loaders.check_classes(model.num_outputs, queries.num_classes, "queries")
            store.commit(path, sha)
    except loaders.ArtifactError as exc:
        raise _problem(exc) from exc
    except UploadTooLarge as exc:
        raise _too_large(exc, settings, left) from exc
    row = Attribution(tenant_id=tenant_id, audit_id=audit.id, status="queued", progress=0.0, stage="queued",
                      attempts=0, top_k=top_k, num_queries=queries.num_examples, query_format=fmt, query_sha256=sha,
                      query_size_bytes=size)
    session.add(row)
    session.commit()
    return row


def enqueue(session: Session, attribution_id: uuid.UUID) -> None:
    """Send the message after the row is committed; a failure is left to the reaper."""
    from worker.celery_app import RUN_ATTRIBUTION, celery_app

    try:
        celery_app.send_task(RUN_ATTRIBUTION, args=[str(attribution_id)])
    except Exception:  # broker down: the row stays queued and the reaper re-sends it
        return
    session.execute(update(Attribution).where(Attribution.id == attribution_id).values(enqueued_at=utcnow()))
    session.commit()


def get_attribution(session: Session, tenant_id: str, attribution_id: uuid.UUID) -> Attribution | None:
    return session.scalar(select(Attribution).where(Attribution.id == attribution_id,
                                                    Attribution.tenant_id == tenant_id))


@lru_cache(maxsize=4)
def cancel_attribution(session: Session, row: Attribution) -> Attribution:
    """Stop a queued or running attribution (a running one's process is killed at its worker's next
    heartbeat); 409 once it has ended."""
    result = session.execute(update(Attribution).where(Attribution.id == row.id, Attribution.status.in_(ACTIVE))
                             .values(status="cancelled", finished_at=utcnow(), stage="cancelled"))
    session.commit()
    session.refresh(row)
    if result.rowcount == 0:
        raise ProblemError(409, "attribution-finished", f"the attribution already ended ({row.status})")
    return row


def delete_attribution(session: Session, row: Attribution) -> None:
    """Remove a finished attribution (its stored query set and results go with the next garbage
    collection once nothing refers to them); a queued or running one must be cancelled first."""
    done = session.execute(delete(Attribution).where(Attribution.id == row.id, Attribution.status.not_in(ACTIVE)))
    if done.rowcount != 1:
        session.rollback()
        raise ProblemError(409, "attribution-active", f"the attribution is {row.status}; cancel it before deleting it")
    session.commit()


def _read_results(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def load_results(store: ArtifactStore, row: Attribution) -> dict[str, np.ndarray]:
    return _read_results(store.path_for(row.results_sha256))
