"""Limits and faults with real processes: request body limit, per-job time limit, a broker that
restarts empty, and a database error while results are written."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid

import httpx
import numpy as np
import psycopg
import pytest
import torch

from tests.conftest import Service, _service_env, free_port, raw_postgres_url
from tests.helpers import (assert_problem, export_onnx, npz_bytes, quick_mlp, synthetic_classification,
                           upload_dataset, upload_model, wait_for_audit)


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory):
    inputs, labels = synthetic_classification(n=2400, features=4, classes=3, seed=5)
    path = export_onnx(quick_mlp(inputs, labels, hidden=5), torch.from_numpy(inputs[:2]),
                       tmp_path_factory.mktemp("faults") / "m.onnx")
    return path, npz_bytes(inputs=inputs, labels=labels)


def _upload(client, slow_inputs):
    path, content = slow_inputs
    m = upload_model(client, path).json()
    d = upload_dataset(client, content).json()
    return {"model_id": m["id"], "dataset_id": d["id"], "method": "exact", "batch_size": 2}


def test_body_limit_and_time_limit(tmp_path, slow_inputs):
    env = _service_env("embedded", None) | {"PBRF_MAX_UPLOAD_BYTES": str(200_000), "PBRF_TASK_SOFT_TIME_LIMIT": "2",
                                            "PBRF_TASK_TIME_LIMIT": "5", "PBRF_BROKER_VISIBILITY_TIMEOUT": "60"}
    svc = Service(env, tmp_path / "limits")
    svc.start()
    try:
        with svc.client() as client:
            big = npz_bytes(inputs=np.zeros((30_000, 4), np.float32), labels=np.zeros(30_000, np.int64))
            assert len(big) > 200_000
            assert_problem(upload_dataset(client, big), 413, "payload-too-large")
            # the same without Content-Length (chunked): the stream is counted and cut at the limit
            boundary = "pbrfboundary"
            head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.npz\"\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n").encode()

            def chunks():
                yield head
                for start in range(0, len(big), 65536):
                    yield big[start : start + 65536]
                yield f"\r\n--{boundary}--\r\n".encode()

            r = client.post("/v1/datasets", content=chunks(),
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            assert_problem(r, 413, "payload-too-large")
            assert not any((svc.data_dir / "artifacts").rglob("*.npz"))
            body = _upload(client, slow_inputs)
            audit = client.post("/v1/audits", json=body).json()
            final, _ = wait_for_audit(client, audit["id"], timeout=60)
            assert final["status"] == "failed" and "time limit of 2 s" in final["error"], final
    finally:
        svc.stop()


def test_flags_stored_are_bounded_and_the_rest_stay_in_the_scores(tmp_path):
    """flag_fraction=1.0 on a large dataset used to write one flag row per example in one transaction
    (2.5M rows held SQLite's lock for 65 s); PBRF_MAX_FLAGS bounds the rows, the summary says so, and
    every score is still served."""
    svc = Service(_service_env("embedded", None) | {"PBRF_MAX_FLAGS": "7"}, tmp_path / "flags")
    svc.start()
    try:
        with svc.client() as client:
            inputs, labels = synthetic_classification(n=60, features=4, classes=3, seed=9)
            path = export_onnx(quick_mlp(inputs, labels, hidden=4), torch.from_numpy(inputs[:2]), tmp_path / "m.onnx")
            body = {"model_id": upload_model(client, path).json()["id"], "method": "identity", "flag_fraction": 1.0,
                    "dataset_id": upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()["id"]}
            final, _ = wait_for_audit(client, client.post("/v1/audits", json=body).json()["id"])
            assert final["status"] == "succeeded", final
            assert final["summary"]["num_flags_stored"] == 7 and "PBRF_MAX_FLAGS" in final["summary"]["flags_note"]
            flags = client.get(f"/v1/audits/{final['id']}/flags", params={"limit": 100}).json()["items"]
            assert [f["rank"] for f in flags] == list(range(1, 8))
            scores = client.get(f"/v1/audits/{final['id']}/scores", params={"limit": 100}).json()["items"]
            assert len(scores) == 60
    finally:
        svc.stop()


def _start_redis(port: int, workdir) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("private redis did not start")


def test_redis_restart_loses_queue_but_audits_still_run(tmp_path, postgres_url, slow_inputs):
    """A private Redis without persistence is killed while audits wait in its queue and restarted
    empty: the database rows are the truth, and the reaper re-sends what the broker lost."""
    port = free_port()
    redis = _start_redis(port, tmp_path)
    env = _service_env("postgres_redis", postgres_url) | {
        "PBRF_BROKER_URL": f"redis://127.0.0.1:{port}/0", "PBRF_STALE_AFTER_SECONDS": "4",
        "PBRF_REAPER_INTERVAL_SECONDS": "1", "PBRF_HEARTBEAT_SECONDS": "0.5"}
    svc = Service(env, tmp_path / "svc")
    svc.start()
    try:
        with svc.client() as client:
            body = _upload(client, slow_inputs)
            first = client.post("/v1/audits", json=body).json()  # occupies the single worker
            queued = [client.post("/v1/audits", json=body | {"method": "identity", "batch_size": 512}).json()
                      for _ in range(2)]
            time.sleep(0.5)
            redis.kill()
            redis.wait()
            redis = _start_redis(port, tmp_path)  # comes back empty
            for audit in [first, *queued]:
                final, _ = wait_for_audit(client, audit["id"], timeout=120)
                assert final["status"] == "succeeded", (final, svc.logs()[-2000:])
            assert "reaper re-enqueued" in svc.logs()
    finally:
        svc.stop()
        redis.kill()


def test_database_error_while_writing_results_leaves_nothing_half_written(tmp_path, postgres_url, slow_inputs):
    """A PostgreSQL trigger makes inserting the flags fail: the result transaction rolls back, the
    audit ends failed with a readable error, and no flag row exists."""
    raw = raw_postgres_url(postgres_url)
    svc = Service(_service_env("postgres_redis", postgres_url), tmp_path / "svc")
    svc.start()
    try:
        with psycopg.connect(raw, autocommit=True) as conn:
            conn.execute("""CREATE FUNCTION refuse_flags() RETURNS trigger AS $$
                            BEGIN RAISE EXCEPTION 'disk full (simulated)'; END $$ LANGUAGE plpgsql""")
            conn.execute("CREATE TRIGGER refuse_flags BEFORE INSERT ON audit_flag FOR EACH ROW EXECUTE FUNCTION refuse_flags()")
        with svc.client() as client:
            body = _upload(client, slow_inputs) | {"method": "identity", "batch_size": 512}
            audit = client.post("/v1/audits", json=body).json()
            final, _ = wait_for_audit(client, audit["id"], timeout=60)
            assert final["status"] == "failed" and "Traceback" not in final["error"], final
            assert final["summary"] is None
            assert_problem(client.get(f"/v1/audits/{audit['id']}/flags"), 409, "audit-not-succeeded")
        with psycopg.connect(raw) as conn:
            assert conn.execute("SELECT count(*) FROM audit_flag").fetchone()[0] == 0
            token = conn.execute("SELECT claim_token FROM audit WHERE id = %s", (audit["id"],)).fetchone()[0]
        # the database's words (the statement, its parameters, the claim token) stay in the worker's log
        assert "database" in final["error"] and token and token not in final["error"], final
        assert not any(word in final["error"].upper() for word in ("SELECT", "UPDATE", "INSERT", "DELETE")), final
    finally:
        svc.stop()


@pytest.mark.parametrize("kind", ["embedded", "postgres_redis"])
def test_a_tenant_storage_quota_refuses_what_would_not_fit_and_deletes_free_it(kind, tmp_path, request):
    """Uploads count their bytes, audits an estimate of their results (96 bytes per example in the scores
    file, 160 per flag row): past PBRF_TENANT_STORAGE_BYTES an upload gets 413 and an audit 422
    `storage-quota-exceeded`, nothing is stored, and deleting an audit frees its share."""
    pg = request.getfixturevalue("postgres_url") if kind == "postgres_redis" else None
    tenant, secret = f"quota-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    svc = Service(_service_env(kind, pg) | {"PBRF_TENANT_STORAGE_BYTES": "40000", "PBRF_API_KEYS": f"{tenant}:{secret}"},
                  tmp_path / "quota")
    svc.start()
    try:
        inputs, labels = synthetic_classification(n=100, features=4, classes=3, seed=2)
        path = export_onnx(quick_mlp(inputs, labels, hidden=4, epochs=1), torch.from_numpy(inputs[:2]), tmp_path / "m.onnx")
        big_inputs, big_labels = synthetic_classification(n=2000, features=4, classes=3, seed=3)
        with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as client:
            model = upload_model(client, path).json()
            dataset = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
            job = {"model_id": model["id"], "dataset_id": dataset["id"], "method": "identity"}
            first, _ = wait_for_audit(client, client.post("/v1/audits", json=job).json()["id"], timeout=120)
            assert first["status"] == "succeeded"  # uses about 4 kB + 100 x 256 bytes of the 40 kB

            files = sorted(p.name for p in (svc.data_dir / "artifacts").rglob("*") if p.is_file())
            assert files  # this service's own store (the database is shared, the store is not)
            body = assert_problem(upload_dataset(client, npz_bytes(inputs=big_inputs, labels=big_labels)), 413,
                                  "storage-quota-exceeded")
            assert "PBRF_TENANT_STORAGE_BYTES" in body["detail"]
            assert len(client.get("/v1/datasets").json()) == 1
            assert sorted(p.name for p in (svc.data_dir / "artifacts").rglob("*") if p.is_file()) == files
            assert_problem(client.post("/v1/audits", json=job), 422, "storage-quota-exceeded")
            assert len(client.get("/v1/audits").json()["items"]) == 1

            assert client.delete(f"/v1/audits/{first['id']}").status_code == 204
            second, _ = wait_for_audit(client, client.post("/v1/audits", json=job).json()["id"], timeout=120)
            assert second["status"] == "succeeded"
    finally:
        svc.stop()


def test_an_audit_past_the_worker_memory_budget_fails_readably(tmp_path):
    """A 1 kB model whose forward pass materialises 2.4 GB passes validation (under its 8 GiB limit) and
    its creation-time estimate (its parameters are few); the audit's process runs under the worker
    budget (RLIMIT_DATA on a CPU worker) and fails saying so instead of taking the memory."""
    from tests.test_bad_inputs import _memory_hog

    svc = Service(_service_env("embedded", None) | {"PBRF_WORKER_MEMORY_BYTES": str(256 * 1024**2)}, tmp_path / "mem")
    svc.start()
    try:
        inputs, labels = synthetic_classification(n=20, features=4, classes=3)
        with svc.client() as client:
            model = upload_model(client, _memory_hog(tmp_path / "hog.onnx", 600_000_000)).json()
            dataset = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
            audit = client.post("/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                                    "method": "identity"})
            assert audit.status_code == 202, audit.text
            final, _ = wait_for_audit(client, audit.json()["id"], timeout=120)
            assert final["status"] == "failed" and "PBRF_WORKER_MEMORY_BYTES" in final["error"], final["error"]
            assert final["attempts"] == 1
    finally:
        svc.stop()


def test_an_audit_outlives_a_database_locked_longer_than_its_busy_timeout(tmp_path):
    """Another connection holds SQLite's write lock for longer than the 30 s busy timeout while an
    audit runs (as another tenant's long delete did): the audit's progress writes are skipped, its
    result write is retried, and it succeeds in its first attempt instead of failing."""
    import sqlite3

    # the default staleness (120 s): with the suite's 30 s, the 33 s lock also keeps the heartbeat from
    # being written long enough for the reaper to take the audit for lost, a separate (correct) path
    svc = Service(_service_env("embedded", None) | {"PBRF_STALE_AFTER_SECONDS": "120"}, tmp_path / "locked")
    svc.start()
    try:
        inputs, labels = synthetic_classification(n=30_000, features=32, classes=5, seed=4)
        path = export_onnx(quick_mlp(inputs[:2000], labels[:2000], hidden=256, epochs=5),
                           torch.from_numpy(inputs[:2]), tmp_path / "m.onnx")
        with svc.client() as client:
            model = upload_model(client, path).json()
            dataset = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
            audit = client.post("/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                                    "method": "ekfac", "batch_size": 100}).json()
            deadline = time.monotonic() + 60
            while client.get(f"/v1/audits/{audit['id']}").json()["status"] == "queued":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            lock = sqlite3.connect(svc.data_dir / "pbrf-audit.db", timeout=60, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")  # in WAL mode: no other writer, readers go on
            try:
                time.sleep(33)
                assert client.get(f"/v1/audits/{audit['id']}").json()["status"] == "running"  # reads went on
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            final, _ = wait_for_audit(client, audit["id"], timeout=180)
        assert final["status"] == "succeeded", (final["error"], svc.logs()[-3000:])
        assert final["attempts"] == 1, svc.logs()[-6000:]
        assert "transient database error" in svc.logs()
    finally:
        svc.stop()
