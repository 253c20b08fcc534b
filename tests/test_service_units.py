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


@pytest.mark.parametrize("wrapped", [False, True], ids=["raised", "as-the-cause"])
def test_a_database_error_fails_the_job_without_its_sql_or_claim_token(tmp_path, wrapped, caplog):
    """A database error other than a transient one fails the audit with a readable, generic error: its
    text (the statement and its parameters, the claim token among them) goes to the worker log only, not
    to audit.error, which the tenant reads. Real SQL on SQLite: a duplicate key raises IntegrityError."""
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session, sessionmaker

    from app.audits.tables import Audit
    from app.core.config import Settings
    from app.core.db import Base
    from worker.jobs import _failed

    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    token, audit_id = uuid.uuid4().hex, uuid.uuid4()
    with Session(engine) as session:
        model, dataset = _model_and_dataset(session)
        row = {"tenant_id": "t", "status": "running", "model_id": model.id, "dataset_id": dataset.id,
               "method": "ekfac", "params": {}, "claim_token": token}
        session.add(Audit(id=audit_id, **row))
        session.commit()
        session.add(Audit(id=audit_id, **row))  # the same key again, with the token among the parameters
        with pytest.raises(IntegrityError) as raised:
            session.commit()
    assert "INSERT" in str(raised.value) and token in str(raised.value)  # what used to reach the tenant
    exc = raised.value
    if wrapped:
        try:
            raise RuntimeError(f"writing the results failed: {exc}") from exc
        except RuntimeError as outer:
            exc = outer
    with caplog.at_level("ERROR", logger="pbrf_audit.worker"):
        assert _failed(exc, Audit, audit_id, token, Settings(data_dir=tmp_path), sessionmaker(engine)) == "failed"
    with Session(engine) as session:
        audit = session.get(Audit, audit_id)
        assert audit.status == "failed" and "IntegrityError" in audit.error and "database" in audit.error
        assert not any(word in audit.error.upper() for word in ("SELECT", "UPDATE", "INSERT", "DELETE", " INTO "))
        assert token not in audit.error and "claim_token" not in audit.error
    assert token in caplog.text  # the details stay in the worker log


def test_a_gpu_out_of_memory_fails_the_audit_naming_the_budget(tmp_path):
    """torch's OutOfMemoryError (a GPU worker past its share of the GPU, see worker.jobs._limit_memory)
    is the budget's message, not an internal error; as is the host's MemoryError."""
    import uuid

    import torch
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session, sessionmaker

    from app.audits.tables import Audit
    from app.core.config import Settings
    from app.core.db import Base
    from worker.jobs import _failed

    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    for exc in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
                MemoryError()):
        token, audit_id = uuid.uuid4().hex, uuid.uuid4()
        with Session(engine) as session:
            model, dataset = _model_and_dataset(session)
            session.add(Audit(id=audit_id, tenant_id="t", status="running", model_id=model.id, dataset_id=dataset.id,
                              method="ekfac", params={}, claim_token=token))
            session.commit()
        assert _failed(exc, Audit, audit_id, token, Settings(data_dir=tmp_path), sessionmaker(engine)) == "failed"
        with Session(engine) as session:
            error = session.get(Audit, audit_id).error
        assert "PBRF_WORKER_MEMORY_BYTES" in error and "internal error" not in error, error


def test_listing_datasets_does_not_read_label_counts_it_does_not_show(tmp_path):
    """A list shows label_counts only for datasets of at most 1000 classes; the others' counts (100k
    classes: about 0.6 MB of JSON each, 3.6 MB once parsed) are not even fetched: the page is the one it
    always was, the SQL never selects their counts, and the list holds a small fraction of their size.
    Real SQL on SQLite."""
    import tracemalloc
    import uuid

    from sqlalchemy import create_engine, event
    from sqlalchemy.orm import Session

    from app.artifacts import repository
    from app.artifacts.schemas import DatasetOut, listed_dataset
    from app.artifacts.tables import DatasetArtifact
    from app.core.db import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'list.db'}")
    Base.metadata.create_all(engine)
    big_ids = [uuid.uuid4() for _ in range(5)]
    with Session(engine) as session:
        _model_and_dataset(session)  # 3 classes: its counts are shown
        session.add(DatasetArtifact(tenant_id="t", name="legacy", format="csv", sha256="c" * 64, size_bytes=10,
                                    num_examples=4, num_classes=1000, input_shape=[2], inputs=None,
                                    label_counts=[0] * 999 + [4]))
        for dataset_id in big_ids:
            session.add(DatasetArtifact(id=dataset_id, tenant_id="t", name="big", format="npz", sha256="e" * 64,
                                        size_bytes=10, num_examples=100_000, num_classes=100_000, input_shape=[2],
                                        label_counts=[1] * 100_000))
        session.add(DatasetArtifact(tenant_id="other", name="theirs", format="npz", sha256="f" * 64, size_bytes=1,
                                    num_examples=1, num_classes=1, input_shape=[1], label_counts=[1]))
        session.commit()

    with Session(engine) as session:  # the page as it was: every row loaded whole, big counts dropped
        rows = session.query(DatasetArtifact).filter_by(tenant_id="t").order_by(DatasetArtifact.created_at.desc())
        expected = [DatasetOut.model_validate(row).model_copy(
            update={"label_counts": row.label_counts if row.num_classes <= 1000 else None}).model_dump(mode="json")
            for row in rows]
    statements = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, parameters, context, many: statements.append((statement, parameters)))
    with Session(engine) as session:
        tracemalloc.start()
        try:
            page = [listed_dataset(row).model_dump(mode="json") for row in repository.list_datasets(session, "t", 100)]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert sorted(page, key=lambda d: d["id"]) == sorted(expected, key=lambda d: d["id"])
    assert [d["label_counts"] for d in page if d["num_classes"] > 1000] == [None] * 5
    assert {len(d["label_counts"]) for d in page if d["num_classes"] <= 1000} == {3, 1000}
    reading_counts = [(sql, params) for sql, params in statements if "label_counts" in sql]
    assert reading_counts and all(" IN " in sql.upper() for sql, _ in reading_counts), statements
    assert not any(dataset_id.hex in str(params) for _, params in reading_counts for dataset_id in big_ids)
    assert peak < 2_000_000, peak  # one big dataset's parsed counts alone take 3.6 MB


def test_the_api_and_the_engine_default_every_audit_setting_alike():
    """The request model (whose values are recorded as the audit's params) and the engine's AuditConfig
    (which the worker builds from those params, unchanged) must not drift apart: an older audit row
    that lacks a setting runs with AuditConfig's default, which must be what the API would have sent."""
    import dataclasses

    from app.audits.schemas import AuditCreate
    from app.core.config import Settings
    from app.influence import AuditConfig
    from worker.jobs import _audit_config

    engine = {f.name: f.default for f in dataclasses.fields(AuditConfig)}
    shared = [name for name in AuditCreate.model_fields if name in engine]
    assert {"method", "damping", "seed", "fisher_samples", "folds", "fold_epochs", "fold_shrink"} <= set(shared)
    for name in shared:
        assert AuditCreate.model_fields[name].default == engine[name], name
    request = AuditCreate(model_id="00000000-0000-0000-0000-000000000001",
                          dataset_id="00000000-0000-0000-0000-000000000002", fold_epochs=7, seed=3, name="x")
    params = request.model_dump(mode="json", exclude={"model_id", "dataset_id", "method", "damping"})
    config = _audit_config(request.method, request.damping, params | {"shard_size": 100}, Settings())
    assert (config.method, config.fold_epochs, config.seed, config.folds) == ("folds", 7, 3, 5)
    assert _audit_config("ekfac", 0.1, {}, Settings()) == dataclasses.replace(
        AuditConfig(method="ekfac", damping=0.1), max_exact_parameters=Settings().max_exact_parameters)
