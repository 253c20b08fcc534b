"""Per-tenant storage quota: what a tenant keeps stored, counted before anything new is stored.

Counted: the bytes of every uploaded model (with its external-data parts) and dataset, and for every
audit that has or will have results (queued, running, succeeded) an estimate of those results: the
scores file (up to 9 eight-byte values per example) and the flag rows, plus its stored curvature file
once written (once per file: audits that reuse a curvature share it); for attributions, their query
set and results. A sharded audit's partial sums are transient (removed with its shard rows) and not counted. A failed or cancelled audit
stores nothing. Uploads and audits are refused with `storage-quota-exceeded` when they would take the
tenant past `PBRF_TENANT_STORAGE_BYTES`; deleting models, datasets or audits frees quota. Two requests
racing past the check can overshoot by one upload each: a soft bound, like the active-audit quota.
"""

from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.artifacts.tables import DatasetArtifact, ModelArtifact
from app.core.config import Settings
from app.core.errors import ProblemError

from .tables import Attribution, Audit

SCORES_BYTES_PER_EXAMPLE = 96
FLAG_ROW_BYTES = 160
ATTRIBUTION_BYTES_PER_RESULT = 32  # a helpful and a harmful (index, score) pair per query and rank
HOLDING_RESULTS = ("queued", "running", "succeeded")


def audit_result_bytes(num_examples: int, max_flags: int) -> int:
    """What an audit's results will take: its scores file and its flag rows."""
    return num_examples * SCORES_BYTES_PER_EXAMPLE + min(num_examples, max_flags) * FLAG_ROW_BYTES


def stored_bytes(session: Session, tenant_id: str, max_flags: int) -> int:
    models = session.scalar(select(func.coalesce(func.sum(ModelArtifact.size_bytes), 0))
                            .where(ModelArtifact.tenant_id == tenant_id))
    parts = sum(int(part.get("size_bytes", 0))
                for listed in session.scalars(select(ModelArtifact.external_data)
                                              .where(ModelArtifact.tenant_id == tenant_id))
                for part in listed or [])
    datasets = session.scalar(select(func.coalesce(func.sum(DatasetArtifact.size_bytes), 0))
                              .where(DatasetArtifact.tenant_id == tenant_id))
    n = DatasetArtifact.num_examples
    flags = case((n < max_flags, n), else_=max_flags)
    results = session.scalar(
        select(func.coalesce(func.sum(n * SCORES_BYTES_PER_EXAMPLE + flags * FLAG_ROW_BYTES), 0))
        .select_from(Audit).join(DatasetArtifact, Audit.dataset_id == DatasetArtifact.id)
        .where(Audit.tenant_id == tenant_id, Audit.status.in_(HOLDING_RESULTS)))
    attributions = session.scalar(
        select(func.coalesce(func.sum(Attribution.query_size_bytes
                                      + Attribution.num_queries * Attribution.top_k * ATTRIBUTION_BYTES_PER_RESULT), 0))
        .where(Attribution.tenant_id == tenant_id, Attribution.status.in_(HOLDING_RESULTS)))
    # a stored curvature once per file: later audits with the same key share the earlier one's
    curvatures = sum(int(size or 0) for _, size in session.execute(
        select(Audit.curvature_sha256, Audit.curvature_size_bytes).distinct()
        .where(Audit.tenant_id == tenant_id, Audit.status.in_(HOLDING_RESULTS), Audit.curvature_sha256.is_not(None))))
    return int(models) + parts + int(datasets) + int(results) + int(attributions) + curvatures


def storage_left(session: Session, settings: Settings, tenant_id: str) -> int | None:
    """Bytes this tenant may still store; None without a quota."""
    if not settings.tenant_storage_bytes:
        return None
    return max(0, settings.tenant_storage_bytes - stored_bytes(session, tenant_id, settings.max_flags))


def quota_exceeded(settings: Settings, left: int, needed: int | None, status: int, what: str) -> ProblemError:
    need = f" it needs {needed / 1024**2:.1f} MiB;" if needed is not None else ""
    return ProblemError(status, "storage-quota-exceeded",
                        f"{what} does not fit in this tenant's storage quota:{need} {left / 1024**2:.1f} MiB of "
                        f"{settings.tenant_storage_bytes / 1024**2:.1f} MiB are left (PBRF_TENANT_STORAGE_BYTES). "
                        "Delete models, datasets or audits you no longer need.")
