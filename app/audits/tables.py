"""Audit jobs (the source of truth for job state) and the examples they flag."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base


class JobLifecycle:
    """The columns of a job's life, shared by audits and attributions (worker/jobs.py drives both):
    queued -> running -> succeeded | failed | cancelled; a claim stamps a token that every later write
    of the attempt must match; the heartbeat shows the attempt is alive."""

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued|running|succeeded|failed|cancelled
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(64))  # which attempt owns the job
    worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Audit(JobLifecycle, Base):
    __tablename__ = "audit"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model.id"))
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("dataset.id"))
    method: Mapped[str] = mapped_column(String(32))
    damping_requested: Mapped[float | None] = mapped_column(Float)
    damping: Mapped[float | None] = mapped_column(Float)  # the value actually used
    params: Mapped[dict] = mapped_column(JSON)
    summary: Mapped[dict | None] = mapped_column(JSON)
    scores_sha256: Mapped[str | None] = mapped_column(String(64))
    # the fitted curvature (safetensors in the store) and what identifies it: a later audit with the
    # same key (tenant, model, dataset, estimator and its settings) scores with it instead of refitting
    curvature_key: Mapped[str | None] = mapped_column(String(64), index=True)
    curvature_sha256: Mapped[str | None] = mapped_column(String(64))
    curvature_size_bytes: Mapped[int | None] = mapped_column(BigInteger)  # counted by the storage quota


class AuditFlag(Base):
    __tablename__ = "audit_flag"
    __table_args__ = (Index("ix_audit_flag_audit_id_example_index", "audit_id", "example_index", unique=True),)

    audit_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("audit.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1 = most suspicious
    example_index: Mapped[int] = mapped_column(Integer)
    given_label: Mapped[int] = mapped_column(Integer)
    predicted_label: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)
    given_label_probability: Mapped[float] = mapped_column(Float)
    # method `loo` only: the approximate out-of-sample view of the example
    suggested_label: Mapped[int | None] = mapped_column(Integer)
    suggested_label_probability: Mapped[float | None] = mapped_column(Float)
    out_of_sample_given_probability: Mapped[float | None] = mapped_column(Float)


class FlagVerdict(Base):
    """A reviewer's verdict on one training example: keyed by the tenant, the dataset's content (the
    uploaded file's sha256) and the example's index, not by an audit, so that every audit of the same
    data (and a re-upload of the same file) shows it. No foreign key: verdicts outlive the audits and
    dataset rows they were made on (deleting a dataset keeps them; they count toward no quota)."""

    __tablename__ = "flag_verdict"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    example_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    verdict: Mapped[str] = mapped_column(String(16))  # mislabeled | correct | unsure
    corrected_label: Mapped[int | None] = mapped_column(Integer)  # set exactly when the verdict is mislabeled
    verdict_by: Mapped[str | None] = mapped_column(String(255))  # the API key's name; null in open mode
    verdict_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Attribution(JobLifecycle, Base):
    """Train-to-query attribution over a succeeded audit's stored curvature: a job with an audit's
    lifecycle, whose results are a file in the store."""

    __tablename__ = "attribution"

    audit_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("audit.id", ondelete="CASCADE"), index=True)
    top_k: Mapped[int] = mapped_column(Integer)
    num_queries: Mapped[int] = mapped_column(Integer)
    query_format: Mapped[str] = mapped_column(String(16))
    query_sha256: Mapped[str] = mapped_column(String(64))
    query_size_bytes: Mapped[int] = mapped_column(Integer)
    results_sha256: Mapped[str | None] = mapped_column(String(64))


class AuditShard(JobLifecycle, Base):
    """One shard of rows of a sharded audit, for one step (a fitting stage or `scores`): a job with an
    audit's lifecycle that any worker may claim, whose result (the shard's partial sums, or its scores)
    is a safetensors file in the store. The audit's own attempt coordinates: it makes the rows, claims
    and runs what no other worker has taken, and reduces. Rows go when the audit ends."""

    __tablename__ = "audit_shard"
    __table_args__ = (UniqueConstraint("audit_id", "step", "shard_index", name="uq_audit_shard_position"),)

    audit_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("audit.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(String(32))  # the estimator's fitting stage, or "scores"
    shard_index: Mapped[int] = mapped_column(Integer)
    plan: Mapped[dict] = mapped_column(JSON)  # how the audit's rows are cut (ShardPlan.to_dict)
    # the fit after the earlier steps, which this step's shards start from (none for the first)
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    result_sha256: Mapped[str | None] = mapped_column(String(64))
    seconds: Mapped[float | None] = mapped_column(Float)
