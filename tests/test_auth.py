"""API keys, tenant isolation and Idempotency-Key through the real HTTP app and CLI."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import ROOT, Service, _service_env
from tests.helpers import assert_problem, export_onnx, npz_bytes, quick_mlp, synthetic_classification, wait_for_audit

ACME, GLOBEX = "acme-secret-0123456789abcdef", "globex-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    svc = Service(_service_env("embedded", None) | {"PBRF_API_KEYS": f"acme:{ACME},globex:{GLOBEX}"},
                  tmp_path_factory.mktemp("secured"))
    svc.start()
    yield svc
    svc.stop()


def client_for(service, secret: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=service.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def acme_objects(secured, tmp_path_factory):
    inputs, labels = synthetic_classification(n=100, features=4, classes=3, seed=9)
    path = export_onnx(quick_mlp(inputs, labels, hidden=4), torch.from_numpy(inputs[:2]),
                       tmp_path_factory.mktemp("acme") / "m.onnx")
    with client_for(secured, ACME) as acme:
        with open(path, "rb") as f:
            m = acme.post("/v1/models", files={"file": ("m.onnx", f)}).json()
        d = acme.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(inputs=inputs, labels=labels))}).json()
        a = acme.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "identity"}).json()
        wait_for_audit(acme, a["id"])
    return {"model": m["id"], "dataset": d["id"], "audit": a["id"]}


def test_keys_are_required_once_configured(secured):
    with client_for(secured, None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        r = anonymous.get("/v1/audits")
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    with client_for(secured, "not-a-key") as wrong:
        assert_problem(wrong.get("/v1/models"), 401, "unauthorized")


def test_tenants_never_see_each_other(secured, acme_objects):
    with client_for(secured, GLOBEX) as globex, client_for(secured, ACME) as acme:
        for path in (f"/v1/models/{acme_objects['model']}", f"/v1/datasets/{acme_objects['dataset']}",
                     f"/v1/audits/{acme_objects['audit']}", f"/v1/audits/{acme_objects['audit']}/flags",
                     f"/v1/audits/{acme_objects['audit']}/scores"):
            assert_problem(globex.get(path), 404, "not-found")
            assert acme.get(path).status_code == 200, path
        assert_problem(globex.post(f"/v1/audits/{acme_objects['audit']}/cancel"), 404)
        for path in (f"/v1/audits/{acme_objects['audit']}", f"/v1/models/{acme_objects['model']}",
                     f"/v1/datasets/{acme_objects['dataset']}"):
            assert_problem(globex.delete(path), 404, "not-found")
            assert acme.get(path).status_code == 200, path
        assert_problem(globex.post("/v1/audits", json={"model_id": acme_objects["model"],
                                                       "dataset_id": acme_objects["dataset"]}), 404)
        assert globex.get("/v1/models").json() == [] and globex.get("/v1/audits").json()["items"] == []
        assert len(acme.get("/v1/models").json()) >= 1


def test_cli_keys_create_list_revoke(secured):
    env = secured.env

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "app.cli", "keys", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True).stdout

    created = cli("create", "--tenant", "initech", "--name", "laptop")
    secret = next(line.split(": ", 1)[1] for line in created.splitlines() if line.startswith("secret: "))
    key_id = next(line.split(": ", 1)[1] for line in created.splitlines() if line.startswith("id: "))
    listing = cli("list")
    assert "tenant=initech" in listing and secret not in listing and secret[:12] in listing
    with client_for(secured, secret) as initech:
        assert initech.get("/v1/models").json() == []
        cli("revoke", key_id)
        assert_problem(initech.get("/v1/models"), 401, "unauthorized")


def test_idempotency_key_replays_the_first_result(secured, acme_objects):
    inputs, labels = synthetic_classification(n=50, features=4, classes=3, seed=11)
    content = npz_bytes(inputs=inputs, labels=labels)
    with client_for(secured, ACME) as acme:
        before = len(acme.get("/v1/datasets").json())
        first = acme.post("/v1/datasets", files={"file": ("d.npz", content)}, headers={"Idempotency-Key": "upload-1"})
        again = acme.post("/v1/datasets", files={"file": ("d.npz", content)}, headers={"Idempotency-Key": "upload-1"})
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json() and again.headers["idempotency-replayed"] == "true"
        assert len(acme.get("/v1/datasets").json()) == before + 1
        other = npz_bytes(inputs=inputs[:10], labels=labels[:10])
        assert_problem(acme.post("/v1/datasets", files={"file": ("d.npz", other)}, headers={"Idempotency-Key": "upload-1"}),
                       422, "idempotency-key-reused")
        # the same key belongs to each tenant separately
        with client_for(secured, GLOBEX) as globex:
            theirs = globex.post("/v1/datasets", files={"file": ("d.npz", content)}, headers={"Idempotency-Key": "upload-1"})
            assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]

        body = {"model_id": acme_objects["model"], "dataset_id": acme_objects["dataset"], "method": "identity"}
        audits_before = len(acme.get("/v1/audits").json()["items"])
        a1 = acme.post("/v1/audits", json=body, headers={"Idempotency-Key": "audit-1"})
        a2 = acme.post("/v1/audits", json=body, headers={"Idempotency-Key": "audit-1"})
        assert a1.status_code == a2.status_code == 202 and a1.json()["id"] == a2.json()["id"]
        assert a2.headers["location"] == f"/v1/audits/{a1.json()['id']}"
        assert len(acme.get("/v1/audits").json()["items"]) == audits_before + 1
        wait_for_audit(acme, a1.json()["id"])
        # a replay after the object was deleted does not hand out its dead id
        assert acme.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
        assert_problem(acme.post("/v1/datasets", files={"file": ("d.npz", content)}, headers={"Idempotency-Key": "upload-1"}),
                       410, "idempotency-replay-deleted")
