"""Review: a tenant's verdicts on flagged examples, and a dataset's labels with the accepted corrections.

A verdict is keyed by (tenant, dataset content sha256, example index), not by the audit it was given
on: every audit of the same data shows it, and so does a re-upload of the same file. Deleting a
dataset keeps its verdicts (they count toward no quota and are reached only through a dataset or
audit with that content). The accepted corrections of a dataset are its `mislabeled` verdicts, each
with its corrected label. The caller commits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.artifacts.loaders import ArtifactError
from app.artifacts.service import _problem, load_uploaded_dataset
from app.artifacts.tables import DatasetArtifact, ModelArtifact
from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.storage import ArtifactStore
from app.core.timeutil import utcnow

from .schemas import LabelChange, VerdictIn
from .service import require_succeeded
from .tables import Audit, AuditFlag, FlagVerdict


def _dataset_sha256(session: Session, audit: Audit) -> str:
    # an audit always has its dataset: deleting a dataset deletes the audits made from it
    return session.scalar(select(DatasetArtifact.sha256).where(DatasetArtifact.id == audit.dataset_id))


def _flag_or_404(session: Session, audit: Audit, index: int) -> AuditFlag:
    """The flag of a succeeded audit at this example index (409 while the audit has not succeeded: its
    flags do not exist yet; 404 when the example is not one of its flags)."""
    require_succeeded(audit)
    flag = session.scalar(select(AuditFlag).where(AuditFlag.audit_id == audit.id, AuditFlag.example_index == index))
    if flag is None:
        raise ProblemError(404, "not-found", f"example {index} is not a flag of audit {audit.id} (see its /flags)")
    return flag


def _corrected_label(session: Session, audit: Audit, flag: AuditFlag, request: VerdictIn) -> int | None:
    """The label a verdict gives the example: the request's, or for `mislabeled` without one the flag's
    suggested label (loo), else the label the model predicts. It must be a class of the audit's model
    (a succeeded audit's model has at least the dataset's classes) and differ from the given label."""
    if request.verdict != "mislabeled":
        return None
    label = request.corrected_label
    if label is None:
        label = flag.suggested_label if flag.suggested_label is not None else flag.predicted_label
        if label == flag.given_label:
            raise ProblemError(422, "corrected-label-required",
                               f"the flag's {'suggested' if flag.suggested_label is not None else 'predicted'} label "
                               f"is its given label {label}: send the right label as corrected_label")
    classes = session.scalar(select(ModelArtifact.num_outputs).where(ModelArtifact.id == audit.model_id))
    if not 0 <= label < classes:
        raise ProblemError(422, "corrected-label-out-of-range",
                           f"corrected_label {label} is not a class of the audit's model: it must be in 0..{classes - 1}")
    if label == flag.given_label:
        raise ProblemError(422, "corrected-label-is-given-label",
                           f"corrected_label {label} is the example's given label; a verdict that keeps the label "
                           "is `correct`")
    return label


def set_verdict(session: Session, audit: Audit, index: int, request: VerdictIn, reviewer: str | None) -> FlagVerdict:
    """Record (or replace) the tenant's verdict on the flagged example `index` of `audit`."""
    flag = _flag_or_404(session, audit, index)
    label = _corrected_label(session, audit, flag, request)
    key = (audit.tenant_id, _dataset_sha256(session, audit), index)
    row = session.get(FlagVerdict, key)
    if row is None:  # two first verdicts at once: the second insert is a 409 conflict (errors.py)
        row = FlagVerdict(tenant_id=key[0], dataset_sha256=key[1], example_index=index)
        session.add(row)
    row.verdict, row.corrected_label, row.verdict_by, row.verdict_at = request.verdict, label, reviewer, utcnow()
    session.flush()
    return row


def withdraw_verdict(session: Session, audit: Audit, index: int) -> None:
    """Delete the tenant's verdict on the flagged example `index` of `audit` (404 when there is none)."""
    _flag_or_404(session, audit, index)
    row = session.get(FlagVerdict, (audit.tenant_id, _dataset_sha256(session, audit), index))
    if row is None:
        raise ProblemError(404, "not-found", f"example {index} of audit {audit.id} has no verdict")
    session.delete(row)
    session.flush()


def verdicts_of(session: Session, audit: Audit, indices: list[int]) -> dict[int, FlagVerdict]:
    """The tenant's verdicts on these examples of the audit's dataset content, by example index."""
    if not indices:
        return {}
    rows = session.scalars(select(FlagVerdict).where(
        FlagVerdict.tenant_id == audit.tenant_id, FlagVerdict.dataset_sha256 == _dataset_sha256(session, audit),
        FlagVerdict.example_index.in_(indices)))
    return {row.example_index: row for row in rows}


@dataclass
class DatasetLabels:
    original: np.ndarray  # int64, as uploaded (and as audited)
    labels: np.ndarray  # int64, with the changes applied
    changes: list[LabelChange]  # in index order


def dataset_labels(session: Session, store: ArtifactStore, settings: Settings, dataset: DatasetArtifact,
                   corrected: bool) -> DatasetLabels:
    """The dataset's labels as the audits read them (the same loader), and with `corrected` the tenant's
    accepted corrections applied: every `mislabeled` verdict on this content, each with its label."""
    try:
        original = load_uploaded_dataset(store.path_for(dataset.sha256), dataset.format, settings).labels
    except ArtifactError as exc:  # no parsing slot free (503 + Retry-After), or the limits were lowered since
        raise _problem(exc) from exc
    labels, changes = original.copy(), []
    if corrected:
        accepted = session.scalars(select(FlagVerdict).where(
            FlagVerdict.tenant_id == dataset.tenant_id, FlagVerdict.dataset_sha256 == dataset.sha256,
            FlagVerdict.verdict == "mislabeled", FlagVerdict.corrected_label.is_not(None))
            .order_by(FlagVerdict.example_index))
        for row in accepted:
            i = row.example_index
            if i < len(original) and row.corrected_label != original[i]:
                labels[i] = row.corrected_label
                changes.append(LabelChange(index=i, label=row.corrected_label, original_label=int(original[i]),
                                           verdict_by=row.verdict_by, verdict_at=row.verdict_at))
    return DatasetLabels(original, labels, changes)
