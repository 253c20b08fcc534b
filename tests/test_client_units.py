"""The Python client (app/client) in the fast layer: Retry-After parsing and backoff as units; problem+json
to typed exceptions, cursor pagination, polling, verdicts and the labels export through the real app in
process (Starlette's TestClient is an httpx.Client, which AuditClient takes as its `http`), on a migrated
SQLite database with finished audits written as rows the way the worker writes them. No server, worker or
broker process; tests/test_client.py runs the client and the CLI against the real service."""

from __future__ import annotations

import csv
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.client import (AuditClient, Backoff, Conflict, Flag, NotFound, ProblemError, RateLimited, ServerError,
                        ServiceUnavailable, Unauthorized, ValidationFailed, WaitTimeout, parse_retry_after)
from app.client.problems import problem_class
from tests.helpers import in_process_app, npz_bytes

KEY = "acme-client-secret-0123456789"
LABELS = np.array([0, 1, 2] * 10, dtype=np.int64)  # 30 examples, 3 classes
DATASET = npz_bytes(inputs=np.arange(60, dtype=np.float32).reshape(30, 2), labels=LABELS)


def test_the_client_imports_nothing_of_the_server():
    """A user's script imports the client without FastAPI, SQLAlchemy, Celery or torch (nor the CLI)."""
    code = ("import sys, app.client, app.client.models, app.client.problems; "
            "print(','.join(m for m in ('fastapi', 'starlette', 'sqlalchemy', 'celery', 'torch', 'numpy', 'onnx', "
            "'kombu', 'alembic', 'typer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the client imported {out.stdout.strip()}"


@pytest.mark.parametrize("header, seconds", [("2", 2.0), (" 0 ", 0.0), ("1.5", 1.5), ("-3", 0.0), (None, None),
                                             ("", None), ("soon", None), ("nan", None)])
def test_retry_after_seconds(header, seconds):
    assert parse_retry_after(header) == seconds


def test_retry_after_http_date():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after("Fri, 02 Jan 2026 03:04:00 GMT", now=now) == 0.0  # in the past: now
    assert parse_retry_after("Fri, 02 Jan 2026 03:04:15 GMT", now=now) == 10.0


def test_backoff_doubles_up_to_its_cap_and_resets():
    backoff = Backoff(initial=0.5, factor=2.0, maximum=5.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5
    with pytest.raises(ValueError):
        Backoff(initial=0)


def test_exception_classes_by_status():
    assert [problem_class(s) for s in (400, 401, 404, 409, 418, 422, 429, 500, 502, 503)][1:] == \
        [Unauthorized, NotFound, Conflict, ProblemError, ValidationFailed, RateLimited, ServerError, ServerError,
         ServiceUnavailable]
    assert issubclass(ServiceUnavailable, ServerError) and issubclass(NotFound, ProblemError)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """An AuditClient on the app in process (tenant acme's key) on a migrated SQLite database."""
    with in_process_app(tmp_path_factory.mktemp("client"), f"acme:{KEY}") as (application, _):
        http = TestClient(application)  # no `with`: the lifespan (validator server) is not needed
        with AuditClient(str(http.base_url), KEY, http=http) as client:
            yield client


def _audit_rows(dataset_id: str, status: str = "succeeded", flags: int = 7) -> str:
    """An audit of the dataset as the worker leaves it: the row and, once succeeded, `flags` flag rows."""
    from app.artifacts.tables import ModelArtifact
    from app.audits.tables import Audit, AuditFlag
    from app.core.db import get_sessionmaker

    with get_sessionmaker()() as session:
        model = ModelArtifact(tenant_id="acme", name="m", format="onnx", sha256="a" * 64, size_bytes=1,
                              num_parameters=9, input_shape=[2], num_outputs=3)
        session.add(model)
        session.flush()
        audit = Audit(tenant_id="acme", model_id=model.id, dataset_id=uuid.UUID(dataset_id), status=status,
                      method="loo", params={}, progress=1.0 if status == "succeeded" else 0.0, stage=status)
        session.add(audit)
        session.flush()
        if status == "succeeded":
            session.add_all([AuditFlag(audit_id=audit.id, rank=rank, example_index=3 * rank,
                                       given_label=int(LABELS[3 * rank]), predicted_label=1, suggested_label=2,
                                       score=1.0 / rank, loss=1.0, given_label_probability=0.1)
                             for rank in range(1, flags + 1)])
        session.commit()
        return str(audit.id)


def _set_status(audit_id: str, status: str, progress: float, stage: str) -> None:
    from app.audits.tables import Audit
    from app.core.db import get_sessionmaker

    with get_sessionmaker()() as session:
        row = session.get(Audit, uuid.UUID(audit_id))
        row.status, row.progress, row.stage = status, progress, stage
        session.commit()


@pytest.fixture(scope="module")
def dataset(api):
    return api.upload_dataset(DATASET, filename="client.npz", name="client-units")


def test_problems_become_typed_exceptions(api, dataset):
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as found:
        api.get_audit(missing)
    e = found.value
    assert (e.status, e.slug, e.title) == (404, "not-found", "Not Found")
    assert e.type == "https://pbrf-audit.dev/problems/not-found" and missing in e.detail
    assert e.body["instance"] == f"/v1/audits/{missing}" == e.instance and e.retry_after is None

    with pytest.raises(ValidationFailed) as invalid:
        api.start_audit(str(uuid.uuid4()), dataset, "ekfac", damping=-1)
    assert invalid.value.status == 422 and invalid.value.slug == "validation-error"
    assert "damping" in invalid.value.detail and invalid.value.errors[0]["loc"][-1] == "damping"

    with pytest.raises(Unauthorized) as refused:
        AuditClient(api.base_url, "not-a-key", http=api._http).list_audits()
    assert refused.value.status == 401 and refused.value.detail


def test_results_of_an_unfinished_audit_are_a_conflict_with_retry_after(api, dataset):
    audit_id = _audit_rows(str(dataset.id), status="queued")
    with pytest.raises(Conflict) as conflict:
        api.flags_page(audit_id)
    assert conflict.value.slug == "audit-not-succeeded" and conflict.value.retry_after == 2.0
    assert f"/v1/audits/{audit_id}" in conflict.value.detail


def test_flags_iterate_across_pages_in_rank_order(api, dataset):
    audit_id = _audit_rows(str(dataset.id), flags=7)
    first = api.flags_page(audit_id, limit=3)
    assert [f.rank for f in first.items] == [1, 2, 3] and first.next_cursor
    flags = list(api.iter_flags(audit_id, page_size=3))
    assert all(isinstance(f, Flag) for f in flags)
    assert [f.rank for f in flags] == list(range(1, 8)) and [f.index for f in flags] == [3 * r for r in range(1, 8)]
    assert list(api.iter_flags(audit_id, page_size=1000)) == flags


def test_wait_honours_retry_after_and_reports_progress(api, dataset):
    audit_id = _audit_rows(str(dataset.id), status="queued")
    slept: list[float] = []
    seen: list[tuple] = []

    def sleep(seconds: float) -> None:  # the worker's part, played between polls
        slept.append(seconds)
        if len(slept) == 1:
            _set_status(audit_id, "running", 0.5, "scores")
        else:
            _set_status(audit_id, "succeeded", 1.0, "done")

    api.sleep = sleep
    try:
        final = api.wait_for_audit(audit_id, on_progress=lambda a: seen.append((a.status, a.stage, a.progress)))
    finally:
        import time

        api.sleep = time.sleep
    assert final.status == "succeeded" and str(final.id) == audit_id
    assert slept == [2.0, 2.0]  # the API's Retry-After while queued or running
    assert seen == [("queued", "queued", 0.0), ("running", "scores", 0.5), ("succeeded", "done", 1.0)]

    queued = _audit_rows(str(dataset.id), status="queued")
    with pytest.raises(WaitTimeout) as timeout:
        api.wait_for_audit(queued, timeout=0)
    assert timeout.value.audit.status == "queued" and isinstance(timeout.value, TimeoutError)


def test_verdicts_and_the_corrected_labels_export(api, dataset, tmp_path):
    audit_id = _audit_rows(str(dataset.id), flags=3)
    verdict = api.put_verdict(audit_id, 3, "mislabeled")  # no label: the flag's suggestion (2)
    assert (verdict.index, verdict.verdict, verdict.corrected_label, verdict.verdict_by) == (3, "mislabeled", 2, "acme")
    assert api.put_verdict(audit_id, 6, "mislabeled", corrected_label=1).corrected_label == 1
    api.put_verdict(audit_id, 9, "unsure")
    api.delete_verdict(audit_id, 9)
    with pytest.raises(NotFound):
        api.delete_verdict(audit_id, 9)
    with pytest.raises(ValidationFailed):
        api.put_verdict(audit_id, 6, "mislabeled", corrected_label=7)  # outside the classes

    changes = api.label_changes(dataset)
    assert [(c.index, c.label, c.original_label) for c in changes.changes] == [(3, 2, 0), (6, 1, 0)]
    exported = api.export_labels(dataset, tmp_path / "labels.csv")
    assert exported.changed_examples == 2 and exported.format == "csv"
    rows = list(csv.DictReader(open(exported.path)))
    expected = LABELS.copy()
    expected[[3, 6]] = [2, 1]
    assert [int(r["label"]) for r in rows] == expected.tolist()
    as_npz = api.export_labels(dataset, tmp_path / "labels.npz")
    with np.load(as_npz.path, allow_pickle=False) as npz:
        assert npz["labels"].tolist() == expected.tolist() and npz["original_labels"].tolist() == LABELS.tolist()
    original = api.export_labels(dataset, tmp_path / "original.bin", format="npz", corrected=False)
    with np.load(original.path, allow_pickle=False) as npz:
        assert npz["labels"].tolist() == LABELS.tolist() and original.changed_examples == 0
    with pytest.raises(NotFound):
        api.export_labels(str(uuid.uuid4()), tmp_path / "missing.csv")
    assert not (tmp_path / "missing.csv").exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["labels.csv", "labels.npz", "original.bin"]  # nothing half-written


def test_listings_and_methods(api, dataset):
    assert dataset.id in {d.id for d in api.list_datasets()}
    assert api.get_dataset(dataset).num_examples == 30
    methods = api.methods()
    assert methods.default in methods.methods and "loo" in methods.methods
    assert all(a.dataset_id == dataset.id for a in api.list_audits())
