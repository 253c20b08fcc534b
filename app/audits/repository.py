"""Queries for audits and flags, always scoped by tenant."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from .tables import Audit, AuditFlag


def get_audit(session: Session, tenant_id: str, audit_id: uuid.UUID) -> Audit | None:
    return session.scalar(select(Audit).where(Audit.id == audit_id, Audit.tenant_id == tenant_id))


def list_audits(session: Session, tenant_id: str, limit: int) -> list[Audit]:
    return list(session.scalars(select(Audit).where(Audit.tenant_id == tenant_id)
                                .order_by(Audit.created_at.desc()).limit(limit)))


def flags_after(session: Session, audit_id: uuid.UUID, after_rank: int, limit: int) -> list[AuditFlag]:
    """Keyset page: flags with rank > after_rank, in rank order."""
    return list(session.scalars(select(AuditFlag).where(AuditFlag.audit_id == audit_id, AuditFlag.rank > after_rank)
                                .order_by(AuditFlag.rank).limit(limit)))


def flag_extent(session: Session, audit_id: uuid.UUID) -> tuple[int, float | None]:
    """How many flag rows the audit has, and the lowest score among them (None without flags)."""
    from sqlalchemy import func

    count, lowest = session.execute(select(func.count(), func.min(AuditFlag.score))
                                    .where(AuditFlag.audit_id == audit_id)).one()
    return int(count), (float(lowest) if lowest is not None else None)
