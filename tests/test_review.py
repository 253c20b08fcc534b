"""Review: verdicts on flags (PUT/DELETE .../flags/{index}/verdict, shown in the flags listing of every
audit of the same data) and a dataset's labels with the accepted corrections (GET /v1/datasets/{id}/labels).

Two layers. The fast one runs the app in process (Starlette's TestClient) on a SQLite database made by the
Alembic migrations, with two tenants' keys; its finished audits are rows written as the worker writes them
(a succeeded audit and its flag rows), so that every bad input can be aimed at a known flag. The last test
goes through the real service on both backends (SQLite + filesystem broker, PostgreSQL + Redis), with audits
computed by a real worker."""

from __future__ import annotations

import csv
import io
import uuid

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers import (assert_problem, export_onnx, in_process_app, npz_bytes, quick_mlp, synthetic_classification,
                           upload_dataset, upload_model, wait_for_audit)

ACME, GLOBEX = "acme-review-secret-0123456789", "globex-review-secret-0123456789"
LABELS = np.array([0, 1, 2] * 6 + [0, 1], dtype=np.int64)  # 20 examples, 3 classes
DATASET = npz_bytes(inputs=np.arange(40, dtype=np.float32).reshape(20, 2), labels=LABELS)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app in process on a migrated SQLite database; tenants acme and globex (static keys) and a key of
    acme's made with the CLI's function, named "ann"."""
    from app.auth import service as auth

    with in_process_app(tmp_path_factory.mktemp("review"), f"acme:{ACME},globex:{GLOBEX}",
                        prepare=lambda session: auth.create_key(session, "acme", "ann")[1]) as (application, ann):
        yield {name: TestClient(application, headers={"Authorization": f"Bearer {secret}"})
               for name, secret in (("acme", ACME), ("ann", ann), ("globex", GLOBEX))}


def _finished_audit(tenant: str, dataset_id: str, flags: list[dict], status: str = "succeeded") -> str:
    """An audit of `dataset_id` as a worker leaves it: the audit row and its flag rows (rank in list order;
    each flag {index, given, predicted, suggested?}), on a model row with 3 outputs."""
    from app.artifacts.tables import ModelArtifact
    from app.audits.tables import Audit, AuditFlag
    from app.core.db import get_sessionmaker

    with get_sessionmaker()() as session:
        model = ModelArtifact(tenant_id=tenant, name="m", format="onnx", sha256="a" * 64, size_bytes=1,
                              num_parameters=9, input_shape=[2], num_outputs=3)
        session.add(model)
        session.flush()
        audit = Audit(tenant_id=tenant, model_id=model.id, dataset_id=uuid.UUID(dataset_id), status=status,
                      method="loo", params={}, progress=1.0 if status == "succeeded" else 0.0, stage=status)
        session.add(audit)
        session.flush()
        if status == "succeeded":
            session.add_all([AuditFlag(audit_id=audit.id, rank=rank, example_index=f["index"], given_label=f["given"],
                                       predicted_label=f["predicted"], suggested_label=f.get("suggested"),
                                       score=1.0 / rank, loss=1.0, given_label_probability=0.1)
                             for rank, f in enumerate(flags, start=1)])
        session.commit()
        return str(audit.id)


def _dataset(client, content: bytes = DATASET) -> str:
    r = client.post("/v1/datasets", files={"file": ("review.npz", content)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


# index 3: given 0, suggested 2 (loo); 7: given 1, predicted 2, no suggestion; 11: the model agrees with the given 2
FLAGS = [{"index": 3, "given": 0, "predicted": 0, "suggested": 2}, {"index": 7, "given": 1, "predicted": 2},
         {"index": 11, "given": 2, "predicted": 2}]


@pytest.fixture(scope="module")
def acme_audit(app):
    dataset = _dataset(app["acme"])
    return {"dataset": dataset, "audit": _finished_audit("acme", dataset, FLAGS)}


def _flags(client, audit_id: str) -> dict[int, dict]:
    r = client.get(f"/v1/audits/{audit_id}/flags")
    assert r.status_code == 200, r.text
    return {f["index"]: f for f in r.json()["items"]}


def _verdict(client, audit_id: str, index: int, body: dict):
    return client.put(f"/v1/audits/{audit_id}/flags/{index}/verdict", json=body)


def test_verdicts_are_given_changed_listed_and_withdrawn(app, acme_audit):
    acme, ann = app["acme"], app["ann"]
    audit = acme_audit["audit"]
    assert {k: _flags(acme, audit)[3][k] for k in ("verdict", "corrected_label", "verdict_by", "verdict_at")} == \
        {"verdict": None, "corrected_label": None, "verdict_by": None, "verdict_at": None}

    # mislabeled without a label takes the suggestion; who is the key's name
    r = _verdict(ann, audit, 3, {"verdict": "mislabeled"})
    assert r.status_code == 200, r.text
    first = r.json()
    assert {k: first[k] for k in ("index", "verdict", "corrected_label", "verdict_by")} == \
        {"index": 3, "verdict": "mislabeled", "corrected_label": 2, "verdict_by": "ann"}
    listed = _flags(acme, audit)
    assert (listed[3]["verdict"], listed[3]["corrected_label"], listed[3]["verdict_by"]) == ("mislabeled", 2, "ann")
    assert listed[3]["verdict_at"] == first["verdict_at"]
    assert listed[7]["verdict"] is None and listed[11]["verdict"] is None

    # no suggestion: the predicted label; a static key is named by its tenant
    r = _verdict(acme, audit, 7, {"verdict": "mislabeled"})
    assert r.status_code == 200 and r.json()["corrected_label"] == 2 and r.json()["verdict_by"] == "acme", r.text

    # PUT again replaces: the label goes with the verdict, and the time moves on
    r = _verdict(acme, audit, 3, {"verdict": "correct"})
    assert r.status_code == 200, r.text
    assert (r.json()["verdict"], r.json()["corrected_label"], r.json()["verdict_by"]) == ("correct", None, "acme")
    assert r.json()["verdict_at"] >= first["verdict_at"]
    r = _verdict(ann, audit, 3, {"verdict": "mislabeled", "corrected_label": 1})
    assert r.status_code == 200 and r.json()["corrected_label"] == 1, r.text
    assert _flags(acme, audit)[3]["corrected_label"] == 1

    # a later audit of the same dataset, and one of a re-upload of the same file, show the verdicts
    later = _finished_audit("acme", acme_audit["dataset"], [FLAGS[1], FLAGS[0]])
    again = _finished_audit("acme", _dataset(acme), [FLAGS[0]])
    for audit_id in (later, again):
        assert (_flags(acme, audit_id)[3]["verdict"], _flags(acme, audit_id)[3]["corrected_label"]) == ("mislabeled", 1)
    assert _flags(acme, later)[7]["verdict_by"] == "acme"
    # ... but not another tenant's audit of the same file
    globex_audit = _finished_audit("globex", _dataset(app["globex"]), FLAGS)
    assert all(f["verdict"] is None for f in _flags(app["globex"], globex_audit).values())

    # withdrawn: gone from every audit of the data; withdrawing again is a 404
    assert acme.delete(f"/v1/audits/{later}/flags/7/verdict").status_code == 204
    assert _flags(acme, audit)[7]["verdict"] is None
    assert_problem(acme.delete(f"/v1/audits/{audit}/flags/7/verdict"), 404, "not-found")
    assert_problem(app["globex"].delete(f"/v1/audits/{audit}/flags/3/verdict"), 404, "not-found")
    assert _flags(acme, audit)[3]["verdict"] == "mislabeled"


def test_labels_with_the_accepted_corrections_as_csv_npz_and_json(app):
    acme = app["acme"]
    # other inputs, the same labels: another content, so that the verdicts of the test above do not count here
    dataset = _dataset(acme, npz_bytes(inputs=np.ones((20, 2), np.float32), labels=LABELS))
    audit = _finished_audit("acme", dataset, FLAGS + [{"index": 5, "given": 2, "predicted": 0}])
    assert _verdict(acme, audit, 3, {"verdict": "mislabeled"}).status_code == 200  # 0 -> 2
    assert _verdict(acme, audit, 7, {"verdict": "mislabeled", "corrected_label": 0}).status_code == 200  # 1 -> 0
    assert _verdict(acme, audit, 5, {"verdict": "unsure"}).status_code == 200  # not a correction
    assert _verdict(acme, audit, 11, {"verdict": "correct"}).status_code == 200
    expected = LABELS.copy()
    expected[3], expected[7] = 2, 0
    path = f"/v1/datasets/{dataset}/labels"

    r = acme.get(path, params={"corrected": "true"}, headers={"Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), r.text
    assert r.headers["x-changed-examples"] == "2"
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(row["index"]) for row in rows] == list(range(20))
    assert [int(row["label"]) for row in rows] == expected.tolist()
    assert [int(row["original_label"]) for row in rows] == LABELS.tolist()

    r = acme.get(path, params={"corrected": "true"})
    assert r.status_code == 200 and r.headers["x-changed-examples"] == "2", r.text
    with np.load(io.BytesIO(r.content), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["labels", "original_labels"]
        assert npz["labels"].tolist() == expected.tolist() and npz["original_labels"].tolist() == LABELS.tolist()

    r = acme.get(path, params={"corrected": "true"}, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert body["num_examples"] == 20 and body["corrected"] is True
    assert [(c["index"], c["label"], c["original_label"], c["verdict_by"]) for c in body["changes"]] == \
        [(3, 2, 0, "acme"), (7, 0, 1, "acme")]
    assert all(c["verdict_at"] for c in body["changes"])

    # corrected=false (the default): the labels as uploaded
    for params in ({"corrected": "false"}, {}):
        r = acme.get(path, params=params)
        assert r.headers["x-changed-examples"] == "0"
        with np.load(io.BytesIO(r.content), allow_pickle=False) as npz:
            assert npz["labels"].tolist() == LABELS.tolist()
    assert acme.get(path, headers={"Accept": "application/json"}).json()["changes"] == []

    # a withdrawn correction is no longer applied; another tenant sees neither the dataset nor the verdicts
    assert acme.delete(f"/v1/audits/{audit}/flags/7/verdict").status_code == 204
    assert acme.get(path, params={"corrected": "true"}).headers["x-changed-examples"] == "1"
    assert_problem(app["globex"].get(path, params={"corrected": "true"}), 404, "not-found")


def test_bad_verdicts_are_problems_and_store_nothing(app, acme_audit):
    acme, globex = app["acme"], app["globex"]
    audit = acme_audit["audit"]
    before = _flags(acme, audit)

    # another tenant's audit, an audit that has not succeeded, an example that is not a flag
    assert_problem(_verdict(globex, audit, 3, {"verdict": "correct"}), 404, "not-found")
    for status in ("queued", "running", "failed"):
        unfinished = _finished_audit("acme", acme_audit["dataset"], [], status=status)
        assert_problem(_verdict(acme, unfinished, 3, {"verdict": "correct"}), 409, "audit-not-succeeded")
        assert_problem(acme.delete(f"/v1/audits/{unfinished}/flags/3/verdict"), 409, "audit-not-succeeded")
    assert_problem(_verdict(acme, audit, 4, {"verdict": "correct"}), 404, "not-found")  # an example, not a flag
    assert_problem(_verdict(acme, str(uuid.uuid4()), 3, {"verdict": "correct"}), 404, "not-found")
    assert_problem(_verdict(acme, audit, -1, {"verdict": "correct"}), 422, "validation-error")
    assert_problem(_verdict(acme, audit, 2**40, {"verdict": "correct"}), 422, "validation-error")

    # labels outside the model's classes, the given label itself, a default that would be the given label
    for label in (3, -1, 2**40):
        assert_problem(_verdict(acme, audit, 11, {"verdict": "mislabeled", "corrected_label": label}), 422,
                       "corrected-label-out-of-range")
    assert_problem(_verdict(acme, audit, 11, {"verdict": "mislabeled", "corrected_label": 2}), 422,
                   "corrected-label-is-given-label")
    assert_problem(_verdict(acme, audit, 11, {"verdict": "mislabeled"}), 422, "corrected-label-required")

    # bodies pydantic refuses: an unknown verdict, a label with a verdict that keeps the label, not an integer
    for body in ({"verdict": "wrong"}, {}, {"verdict": "correct", "corrected_label": 1},
                 {"verdict": "mislabeled", "corrected_label": "1"}, {"verdict": "mislabeled", "corrected_label": 1.5},
                 {"verdict": "mislabeled", "corrected_label": True}, {"verdict": "unsure", "note": "x"}):
        problem = assert_problem(_verdict(acme, audit, 11, body), 422, "validation-error")
        assert problem["errors"], problem

    assert _flags(acme, audit) == before  # none of them stored or changed anything


# ------------------------------------------------------------------ through the real service, real audits
def test_review_through_the_real_service(client, service, tmp_path):
    """A loo audit suggests labels; a verdict without a label takes the suggestion; a second audit of the
    same dataset (every example flagged) shows the verdicts; the corrected export applies them."""
    inputs, labels = synthetic_classification(n=150, features=4, classes=3, seed=11)
    noisy = labels.copy()
    noisy[:8] = (labels[:8] + 1) % 3  # a few flipped labels for the audit to find
    model = quick_mlp(inputs, labels, hidden=6)
    path = export_onnx(model, torch.from_numpy(inputs[:2]), tmp_path / "review.onnx")
    m = upload_model(client, path).json()
    d = upload_dataset(client, npz_bytes(inputs=inputs, labels=noisy)).json()
    loo = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "loo",
                                          "curvature": "exact"}).json()
    final, _ = wait_for_audit(client, loo["id"])
    assert final["status"] == "succeeded", (final, service.logs()[-3000:])
    flags = client.get(f"/v1/audits/{loo['id']}/flags").json()["items"]
    mislabeled = next(f for f in flags if f["suggested_label"] != f["given_label"])
    kept = next(f for f in flags if f["index"] != mislabeled["index"])

    r = client.put(f"/v1/audits/{loo['id']}/flags/{mislabeled['index']}/verdict", json={"verdict": "mislabeled"})
    assert r.status_code == 200, r.text
    assert r.json()["corrected_label"] == mislabeled["suggested_label"] and r.json()["verdict_by"] is None
    assert client.put(f"/v1/audits/{loo['id']}/flags/{kept['index']}/verdict",
                      json={"verdict": "correct"}).status_code == 200

    second = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "identity",
                                             "flag_fraction": 1.0}).json()
    assert wait_for_audit(client, second["id"])[0]["status"] == "succeeded"
    listed = {f["index"]: f for f in client.get(f"/v1/audits/{second['id']}/flags", params={"limit": 1000}).json()["items"]}
    assert len(listed) == 150
    assert (listed[mislabeled["index"]]["verdict"], listed[mislabeled["index"]]["corrected_label"]) == \
        ("mislabeled", mislabeled["suggested_label"])
    assert listed[kept["index"]]["verdict"] == "correct"
    assert sum(f["verdict"] is not None for f in listed.values()) == 2

    r = client.get(f"/v1/datasets/{d['id']}/labels", params={"corrected": "true"}, headers={"Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["x-changed-examples"] == "1", r.text
    rows = list(csv.DictReader(io.StringIO(r.text)))
    expected = noisy.copy()
    expected[mislabeled["index"]] = mislabeled["suggested_label"]
    assert [int(row["label"]) for row in rows] == expected.tolist()
    assert [int(row["original_label"]) for row in rows] == noisy.tolist()
