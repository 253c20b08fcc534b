"""Audit lifecycle on the API side: create (row first, message second), cancel, read results."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.artifacts import loaders
from app.artifacts import repository as artifacts
from app.artifacts.service import dataset_inputs, model_inputs
from app.core.config import get_settings
from app.core.errors import ProblemError, not_found
from app.core.storage import ArtifactStore
from app.core.timeutil import utcnow
from app.influence.registry import ESTIMATORS, available_methods

from .quota import audit_result_bytes, quota_exceeded, storage_left
from .schemas import TERMINAL, AuditCreate
from .tables import Attribution, Audit, AuditFlag, AuditShard

# part of every curvature key: a change to what a stored fit holds makes old fits unused, not misread
CURVATURE_FORMAT = "pbrf-audit blockwise curvature v1"
POLL_SECONDS = 2  # Retry-After on answers about a job still queued or running
log = logging.getLogger(__name__)


def estimate_worker_bytes(request: AuditCreate, num_parameters: int, num_outputs: int, num_examples: int,
                          values_per_example: int) -> dict[str, int]:
    """What an audit's parameters make the worker allocate, priced before it is queued (a request that
    cannot fit would be killed, retried and killed again). Upper estimates of the big terms only; the
    blockwise estimators plan their own batches within a fixed budget (BATCH_STATE_BYTES)."""
    P, C, N = num_parameters, num_outputs, num_examples
    dense = request.method == "exact" or (request.method == "loo" and request.curvature == "exact")
    lanczos = request.method == "lanczos" or (request.method == "loo" and request.curvature == "lanczos")
    # the explicit batch's per-example Jacobians (B x C x P, float32 and a float64 copy); an automatic
    # batch size is chosen to keep them small
    jacobians = (request.batch_size or 0) * C * P * 12 if request.method in ("exact", "cg", "loo", "lanczos") else 0
    estimate = {
        "the dataset (loaded, packed)": N * values_per_example * 8 * 2,
        "per-example results": N * 8 * 12,
        "dense curvature (P x P, float64, 3 copies)": 3 * P * P * 8 if dense else 0,
        "Lanczos basis (rank x P, float64, 2 copies)": 2 * request.lanczos_rank * P * 8 if lanczos else 0,
        "batch Jacobians": jacobians,
        # method folds: a copy of the model, its best weights, its gradients and Adam's two moments
        "fold unlearning copies (5 x P, float32)": 5 * P * 4 if request.method == "folds" else 0,
        # the PBRF check runs the whole dataset in float64 at once (inputs, outputs, a few activations'
        # worth) and, for models up to 3,000 parameters, dense Hessians
        "PBRF verification": (N * (values_per_example + C) * 8 * 8 + (3 * P * P * 8 if P <= 3000 else 0)
                              if request.verify_top_k else 0),
    }
    return estimate


def create_audit(*, session: Session, tenant_id: str, request: AuditCreate) -> Audit:
    model = artifacts.get_model(session, tenant_id, request.model_id)
    if model is None:
        raise not_found("model", request.model_id)
    dataset = artifacts.get_dataset(session, tenant_id, request.dataset_id)
    if dataset is None:
        raise not_found("dataset", request.dataset_id)
    if request.method not in available_methods():
        raise ProblemError(422, "unknown-method",
                           f"unknown method {request.method!r}; available: {', '.join(available_methods())}")
    try:  # names, shapes, dtypes and id ranges, and the classes, from what both uploads recorded
        loaders.match_inputs(model_inputs(model), dataset_inputs(dataset))
        loaders.check_classes(model.num_outputs, dataset.num_classes)
    except loaders.ArtifactError as exc:
        raise ProblemError(exc.status, exc.slug, exc.detail) from exc
    settings = get_settings()
    dense = request.method == "exact" or (request.method == "loo" and request.curvature == "exact")
    if dense and model.num_parameters > settings.max_exact_parameters:
        raise ProblemError(422, "model-too-large-for-method",
                           f"the exact curvature forms a dense {model.num_parameters}^2 matrix; it is limited to "
                           f"{settings.max_exact_parameters} parameters. Use ekfac, kfac, diagonal or lanczos.")
    if request.method == "cg" and dataset.num_examples > 512:
        raise ProblemError(422, "dataset-too-large-for-method",
                           "method 'cg' solves one linear system per example and is limited to 512 examples; "
                           "use ekfac or exact")
    if request.method == "folds" and dataset.num_examples < 2 * request.folds:
        raise ProblemError(422, "dataset-too-small-for-method",
                           f"method 'folds' predicts each of {request.folds} folds from a copy trained on the others "
                           f"and needs at least {2 * request.folds} examples (this dataset has "
                           f"{dataset.num_examples}); lower `folds` or use ekfac")
    values = sum(math.prod(spec["shape"]) for spec in dataset_inputs(dataset))
    estimate = estimate_worker_bytes(request, model.num_parameters, model.num_outputs, dataset.num_examples, values)
    total = sum(estimate.values())
    if total > settings.worker_memory_bytes:
        parts = ", ".join(f"{name} {size / 1024**3:.2f} GiB" for name, size in estimate.items() if size)
        raise ProblemError(422, "audit-over-memory-budget",
                           f"this audit would need about {total / 1024**3:.1f} GiB of worker memory ({parts}); the "
                           f"worker budget is {settings.worker_memory_bytes / 1024**3:.1f} GiB (PBRF_WORKER_MEMORY_BYTES)"
                           ". Lower the parameter that dominates (lanczos_rank, batch_size, verify_top_k) or use ekfac.")
    left = storage_left(session, settings, tenant_id)
    needed = audit_result_bytes(dataset.num_examples, settings.max_flags)
    if left is not None and needed > left:
        raise quota_exceeded(settings, left, needed, 422, "this audit's results")
    # A per-tenant quota keeps one client from filling the shared queue. It is a soft bound: two
    # requests racing past the count can overshoot it by one each, which is harmless.
    active = session.scalar(select(func.count()).select_from(Audit)
                            .where(Audit.tenant_id == tenant_id, Audit.status.in_(("queued", "running"))))
    if active >= settings.max_active_audits_per_tenant:
        raise ProblemError(429, "too-many-active-audits",
                           f"this tenant already has {active} queued or running audits (the limit is "
                           f"{settings.max_active_audits_per_tenant}); wait for one to finish or cancel one",
                           headers={"Retry-After": "30"})
    params = request.model_dump(mode="json", exclude={"model_id", "dataset_id", "method", "damping"})
    params["shard_size"] = request.shard_size or settings.shard_size  # the server default, recorded
    audit = Audit(tenant_id=tenant_id, model_id=model.id, dataset_id=dataset.id, status="queued",
                  method=request.method, damping_requested=request.damping, damping=request.damping, params=params,
                  progress=0.0, stage="queued", attempts=0, curvature_key=curvature_key(tenant_id, request))
    session.add(audit)
    session.flush()
    return audit


def curvature_key(tenant_id: str, request: AuditCreate) -> str | None:
    """What identifies the curvature an audit fits, for estimators that store theirs: the same tenant,
    model, dataset, estimator and fitting settings give the same fit (batch size and the flag rule do
    not enter it). None for methods whose curvature is not stored."""
    name = request.method
    if name == "loo":
        name = "ekfac" if request.curvature == "auto" else request.curvature
    estimator = ESTIMATORS.get(name)
    if estimator is None or not estimator.stores_curvature:
        return None
    identity = {"format": CURVATURE_FORMAT, "tenant": tenant_id, "model": str(request.model_id),
                "dataset": str(request.dataset_id), "estimator": name, "damping": request.damping,
                "weight_decay": request.weight_decay, "fisher_samples": request.fisher_samples, "seed": request.seed}
    if name == "lanczos":  # its rank is part of what is fitted (the other estimators' keys stay as they were)
        identity["lanczos_rank"] = request.lanczos_rank
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def enqueue(session: Session, audit_id: uuid.UUID) -> None:
    """Send the message (only the id) after the row is committed; a failure is left to the reaper."""
    from worker.celery_app import RUN_AUDIT, celery_app

    try:
        celery_app.send_task(RUN_AUDIT, args=[str(audit_id)])
    except Exception:  # broker down: the row stays queued and the reaper re-sends it
        log.exception("could not enqueue audit %s; the reaper will retry", audit_id)
        return
    session.execute(update(Audit).where(Audit.id == audit_id).values(enqueued_at=utcnow()))
    session.commit()


def cancel_audit(session: Session, audit: Audit) -> Audit:
    if audit.status in TERMINAL:
        raise ProblemError(409, "audit-finished", f"the audit already ended ({audit.status})")
    # Compare-and-set on the status, so a job finishing at the same moment wins cleanly.
    result = session.execute(update(Audit).where(Audit.id == audit.id, Audit.status.in_(("queued", "running")))
                             .values(status="cancelled", finished_at=utcnow(), stage="cancelled"))
    if result.rowcount == 1:  # a shard running on another worker sees its row gone and is stopped
        session.execute(delete(AuditShard).where(AuditShard.audit_id == audit.id))
    session.commit()
    session.refresh(audit)
    if result.rowcount == 0:
        raise ProblemError(409, "audit-finished", f"the audit already ended ({audit.status})")
    return audit


ACTIVE = ("queued", "running")


def delete_audit(session: Session, audit: Audit) -> None:
    """Remove a finished audit and its results (the stored scores file goes with the next garbage
    collection once nothing refers to it). A queued or running audit must be cancelled first."""
    if audit.status in ACTIVE:
        raise ProblemError(409, "audit-active", f"the audit is {audit.status}; cancel it before deleting it")
    _refuse_active_attributions(session, [audit.id])
    _delete_finished_audits(session, [audit.id], ProblemError(
        409, "audit-active", "the audit is queued or running; cancel it before deleting it"))
    session.commit()


def _refuse_active_attributions(session: Session, audit_ids) -> None:
    """An attribution still queued or running needs its audit's curvature, model and dataset."""
    active = session.scalars(select(Attribution.id).where(Attribution.audit_id.in_(list(audit_ids)),
                                                          Attribution.status.in_(ACTIVE)).limit(1)).first()
    if active is not None:
        raise ProblemError(409, "attribution-active", f"attribution {active} is queued or running on this audit's "
                           "results; wait for it to finish before deleting")


def delete_input(session: Session, tenant_id: str, row, kind: str) -> None:
    """Remove an uploaded model or dataset with the finished audits made from it. Refused (409) while an
    audit that uses it is queued or running: the worker would lose its input.

    A dataset's review verdicts stay (table flag_verdict): they are keyed by the tenant and the file's
    content, not by the dataset row, so a re-upload of the same file shows them again. They count toward
    no quota and are reachable only through a dataset or audit with that content."""
    column = Audit.model_id if kind == "model" else Audit.dataset_id
    uses = select(Audit.id).where(Audit.tenant_id == tenant_id, column == row.id)
    active = session.scalars(uses.where(Audit.status.in_(ACTIVE)).limit(1)).first()
    if active is not None:
        raise ProblemError(409, f"{kind}-in-use", f"audit {active} is queued or running on this {kind}; "
                           "cancel it or wait for it to finish before deleting")
    finished = session.scalars(uses).all()
    _refuse_active_attributions(session, finished)
    # One transaction per audit: each holds the write lock for at most max_flags flag rows, where one
    # transaction for all of them would hold it for their sum (a dataset audited many times) and lock
    # other tenants' writes out. Each step leaves a consistent state: a crash, or a 409 below, leaves the
    # input with fewer finished audits, and deleting it again finishes the job.
    in_use = ProblemError(409, f"{kind}-in-use", f"an audit was queued on this {kind} while it was being "
                          "deleted; cancel it or wait for it to finish, then delete again")
    for audit_id in finished:
        _delete_finished_audits(session, [audit_id], in_use)
        session.commit()
    # an audit created on the input meanwhile: refused while it runs, removed with the input once finished
    _delete_finished_audits(session, session.scalars(uses).all(), in_use)
    session.delete(row)
    session.commit()


def _delete_finished_audits(session: Session, audit_ids, refusal: ProblemError) -> None:
    """Delete audits and their rows, compare-and-set: if one of them was (re)queued meanwhile, nothing
    is deleted and `refusal` is raised."""
    audit_ids = list(audit_ids)
    if not audit_ids:
        return
    _refuse_active_attributions(session, audit_ids)  # again: one may have been queued since the first check
    session.execute(delete(Attribution).where(Attribution.audit_id.in_(audit_ids)))
    session.execute(delete(AuditFlag).where(AuditFlag.audit_id.in_(audit_ids)))
    session.execute(delete(AuditShard).where(AuditShard.audit_id.in_(audit_ids)))
    done = session.execute(delete(Audit).where(Audit.id.in_(audit_ids), Audit.status.not_in(ACTIVE)))
    if done.rowcount != len(audit_ids):
        session.rollback()
        raise refusal


def referenced_digests(session: Session) -> set[str]:
    """Every stored file a row still points at (the garbage collector keeps these)."""
    from app.artifacts.tables import DatasetArtifact, ModelArtifact

    digests = set(session.scalars(select(ModelArtifact.sha256)))
    for parts in session.scalars(select(ModelArtifact.external_data)):
        digests |= {part["sha256"] for part in parts or []}
    digests |= set(session.scalars(select(DatasetArtifact.sha256)))
    digests |= set(session.scalars(select(Audit.scores_sha256).where(Audit.scores_sha256.is_not(None))))
    digests |= set(session.scalars(select(Audit.curvature_sha256).where(Audit.curvature_sha256.is_not(None))))
    digests |= set(session.scalars(select(Attribution.query_sha256)))
    for column in (AuditShard.input_sha256, AuditShard.result_sha256):  # a sharded audit's work in progress
        digests |= set(session.scalars(select(column).where(column.is_not(None))))
    digests |= set(session.scalars(select(Attribution.results_sha256).where(Attribution.results_sha256.is_not(None))))
    return digests


def require_succeeded(job: Audit | Attribution, needs: str = "results exist") -> None:
    """Results of a job (an audit or an attribution) exist only once it has succeeded: 409 otherwise,
    with Retry-After and where to poll while it may still succeed."""
    if job.status != "succeeded":
        kind = job.__tablename__
        detail = f"the {kind} is {job.status}; {needs} only once it has succeeded"
        headers = None
        if job.status == "failed":
            detail += f" (error: {job.error})"
        elif job.status in ("queued", "running"):  # it may still succeed: say where and when to look again
            detail += f": poll GET /v1/{kind}s/{job.id} until its status is succeeded (Retry-After: seconds)"
            headers = {"Retry-After": str(POLL_SECONDS)}
        raise ProblemError(409, f"{kind}-not-succeeded", detail, headers=headers)


@lru_cache(maxsize=4)  # whole score arrays: keep few in the API process
def _read_scores(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def load_scores(store: ArtifactStore, audit: Audit) -> dict[str, np.ndarray]:
    return _read_scores(store.path_for(audit.scores_sha256))
