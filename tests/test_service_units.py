"""Fast, in-process checks of the service's small pure pieces (no server, no database)."""

from __future__ import annotations

import base64
import json

import pytest

from app.core.errors import ProblemError
from app.core.pagination import decode_cursor, encode_cursor
from tests.helpers import model_and_dataset_rows


def _forge(payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    _forge({"rank": 2**63}), _forge({"rank": True}), _forge({"rank": -1}), _forge({"rank": 1.5}),
    _forge({"index": 3}), _forge([1]), "zzz", "%%%", base64.b64encode(b"\xff\xfe").decode(),
])
def test_forged_cursors_are_a_400_not_a_server_error(cursor):
    with pytest.raises(ProblemError) as err:
        decode_cursor(cursor, "rank")
    assert err.value.status == 400


def test_cursors_round_trip():
    assert decode_cursor(encode_cursor("rank", 41), "rank") == 41 and decode_cursor(None, "rank") == 0


@pytest.mark.parametrize("field", ["damping", "weight_decay", "flag_fraction", "pbrf_epsilon"])
def test_nan_and_infinite_audit_parameters_are_refused_as_such(field):
    """NaN used to be refused as 'less than or equal to 1000000', which is not the problem."""
    from pydantic import ValidationError

    from app.audits.schemas import AuditCreate

    ids = {"model_id": "00000000-0000-4000-8000-000000000000", "dataset_id": "00000000-0000-4000-8000-000000000001"}
    for value in ("NaN", "Infinity"):
        with pytest.raises(ValidationError) as err:
            AuditCreate.model_validate_json(f'{{"model_id": "{ids["model_id"]}", "dataset_id": "{ids["dataset_id"]}", '
                                            f'"{field}": {value}}}')
        assert "finite" in str(err.value)


def test_audit_memory_estimate_grows_with_the_parameters_that_drive_it():
    from app.audits.schemas import AuditCreate
    from app.audits.service import estimate_worker_bytes

    ids = {"model_id": "00000000-0000-4000-8000-000000000000", "dataset_id": "00000000-0000-4000-8000-000000000001"}
    P, C, N, D = 529_000, 10, 100_000, 64
    ekfac = sum(estimate_worker_bytes(AuditCreate(**ids), P, C, N, D).values())
    lanczos = sum(estimate_worker_bytes(AuditCreate(**ids, method="lanczos", lanczos_rank=2048), P, C, N, D).values())
    exact = estimate_worker_bytes(AuditCreate(**ids, method="exact", batch_size=8192), 12_000, C, N, D)
    verify = estimate_worker_bytes(AuditCreate(**ids, verify_top_k=1), 2_000, C, N, D)
    assert ekfac < 1024**3 < 8 * 1024**3 < lanczos  # 2 x 2048 x 529k x 8 bytes = 17 GB
    assert exact["batch Jacobians"] == 8192 * C * 12_000 * 12 and exact["dense curvature (P x P, float64, 3 copies)"] > 0
    assert verify["PBRF verification"] > 0


def _model_and_dataset(session):
    return model_and_dataset_rows(session, "t")


def test_the_storage_quota_counts_each_stored_curvature_file_once(tmp_path):
    """An audit's stored curvature counts against its tenant's quota once written, once per file
    (audits that reuse a curvature share it), not while failed or for another tenant. Real SQL on an
    in-process SQLite database."""
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.audits.quota import audit_result_bytes, stored_bytes
    from app.audits.tables import Audit
    from app.core.db import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'quota.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        model, dataset = _model_and_dataset(session)

        def audit(status, sha=None, size=None, tenant="t"):
            session.add(Audit(id=uuid.uuid4(), tenant_id=tenant, status=status, model_id=model.id,
                              dataset_id=dataset.id, method="ekfac", params={}, curvature_sha256=sha,
                              curvature_size_bytes=size))

        audit("succeeded", "c" * 64, 7000)
        audit("succeeded", "c" * 64, 7000)  # reused the first one's curvature
        audit("succeeded", "d" * 64, 500)
        audit("failed", "e" * 64, 100_000)  # nothing is kept for a failed audit
        audit("queued")
        audit("succeeded", "f" * 64, 300_000, tenant="other")
        session.commit()
        results = 4 * audit_result_bytes(50, max_flags=1000)  # the four of tenant t holding results
        assert stored_bytes(session, "t", max_flags=1000) == 1000 + 2000 + results + 7000 + 500


def test_open_mode_ends_within_a_second_of_the_first_key_and_a_revoked_key_at_once(tmp_path, monkeypatch):
    """Whether any key exists is cached for OPEN_MODE_CHECK_SECONDS (polls in open mode would otherwise
    each count the key table); a presented key is looked up every time. Real SQL on SQLite."""
    import time

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.auth import service as auth
    from app.core.db import Base

    monkeypatch.setattr(auth, "_any_keys_seen", {})
    engine = create_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        assert auth.any_keys(session, {}) is False
        row, secret = auth.create_key(session, "acme", "ci")
        session.commit()
        assert auth.tenant_for_secret(session, secret, {}) == "acme"
        time.sleep(auth.OPEN_MODE_CHECK_SECONDS + 0.05)
        assert auth.any_keys(session, {}) is True
        assert auth.revoke_key(session, row.id)
        session.commit()
        assert auth.tenant_for_secret(session, secret, {}) is None  # no cache on the presented key


def test_deleting_a_dataset_takes_one_short_transaction_per_audit(tmp_path):
    """A dataset audited many times is deleted audit by audit, each in its own transaction (so the write
    lock is never held for all their flag rows at once), then the dataset; everything is gone. An audit
    still running refuses the deletion before anything is deleted. Real SQL on SQLite."""
    import uuid

    from sqlalchemy import create_engine, event, func, select
    from sqlalchemy.orm import Session

    from app.artifacts.tables import DatasetArtifact
    from app.audits.service import delete_input
    from app.audits.tables import Audit, AuditFlag
    from app.core.db import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'delete.db'}")
    Base.metadata.create_all(engine)
    commits = []
    with Session(engine) as session:
        model, dataset = _model_and_dataset(session)
        ids = [uuid.uuid4() for _ in range(3)]
        for i, audit_id in enumerate(ids):
            session.add(Audit(id=audit_id, tenant_id="t", status="queued" if i == 2 else "succeeded",
                              model_id=model.id, dataset_id=dataset.id, method="ekfac", params={}))
            session.flush()
            session.add_all([AuditFlag(audit_id=audit_id, rank=r, example_index=r, given_label=0, predicted_label=1,
                                       score=1.0, loss=1.0, given_label_probability=0.1) for r in range(1, 101)])
        session.commit()
        with pytest.raises(ProblemError) as refused:
            delete_input(session, "t", dataset, "dataset")
        assert refused.value.status == 409
        assert session.scalar(select(func.count()).select_from(AuditFlag)) == 300  # nothing deleted
        session.get(Audit, ids[2]).status = "failed"
        session.commit()
        event.listen(session, "after_commit", lambda s: commits.append(1))
        delete_input(session, "t", dataset, "dataset")
        assert len(commits) == 4  # three audits, then the dataset
        assert session.scalar(select(func.count()).select_from(AuditFlag)) == 0
        assert session.scalar(select(func.count()).select_from(Audit)) == 0
        assert session.get(DatasetArtifact, dataset.id) is None
