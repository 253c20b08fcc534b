"""A sharded audit over two real worker processes scores every example as one worker does.

The service runs with PBRF_WORKER_CONCURRENCY=2 (two prefork pool processes). An audit over more
than shard_size examples is cut into shards for each step (EK-FAC's covariance and eigenvalue passes,
then the scores); the audit's own process and the idle one share them. The same audit with a shard
size above N runs in one process: the scores must agree to float32 rounding (the Fisher labels are
drawn per example from the seed, whatever the sharding)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest
import sqlalchemy
import torch

from app.artifacts.loaders import load_onnx
from app.influence import AuditConfig, run_audit
from tests.conftest import Service, _service_env, fresh_postgres_database
from tests.helpers import (all_pages, export_onnx, npz_bytes, quick_mlp, synthetic_classification, upload_dataset,
                           upload_model, wait_for_audit)


@pytest.fixture(scope="module", params=["embedded", "postgres_redis"])
def two_workers(request, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(fresh_postgres_database()) if request.param == "postgres_redis" else None
        # one torch thread per worker process on any machine, so that the in-process reference of the
        # folds test runs the same float32 arithmetic as the workers
        svc = Service(_service_env(request.param, pg) | {"PBRF_WORKER_CONCURRENCY": "2", "PBRF_WORKER_THREADS": "1"},
                      tmp_path_factory.mktemp(f"shards-{request.param}"))
        svc.kind = request.param
        svc.start()
        yield svc
        svc.stop()


def _mlp_and_data(client, inputs, labels, tmp_path, epochs: int):
    """A 128-unit MLP fitted to the data, exported and uploaded with the data: (model, dataset, path)."""
    model = quick_mlp(inputs, labels, hidden=128, epochs=epochs)
    path = export_onnx(model, torch.from_numpy(inputs[:2]), tmp_path / "m.onnx")
    return (upload_model(client, path).json(), upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json(),
            path)


def _scores(client, audit_id) -> np.ndarray:
    return np.array([row["score"] for row in all_pages(client, f"/v1/audits/{audit_id}/scores", limit=10_000)])


def test_sharded_audit_over_two_workers_equals_one_workers(two_workers, tmp_path):
    inputs, labels = synthetic_classification(n=6000, features=32, classes=5, seed=11)
    with two_workers.client() as client:
        m, d, _ = _mlp_and_data(client, inputs, labels, tmp_path, epochs=30)
        body = {"model_id": m["id"], "dataset_id": d["id"], "method": "ekfac", "seed": 7, "batch_size": 100}
        sharded = client.post("/v1/audits", json=body | {"shard_size": 500}).json()
        final, seen = wait_for_audit(client, sharded["id"], timeout=300)
        assert final["status"] == "succeeded", (final["error"], two_workers.logs()[-4000:])
        shards = final["summary"]["shards"]
        # 11 shards of 500, then the last 500 rows in batches of 100 (guided: a step ends on small shards)
        assert shards["num_shards"] == 16 and shards["shard_size"] == 500
        assert shards["fit_stages"] == ["covariance", "eigenvalues"]
        assert final["params"]["shard_size"] == 500  # recorded as requested
        assert any("of 16 shards" in (stage or "") for _, stage, _ in seen)  # progress counts shards
        if two_workers.kind == "postgres_redis":  # Redis hands the announced shards out at once
            assert len(shards["shards_per_process"]) >= 2, shards  # the audit's process and the other worker's
        assert shards["shard_runs"] == 3 * 16

        one = client.post("/v1/audits", json=body | {"shard_size": 1_000_000, "seed": 7}).json()
        single, _ = wait_for_audit(client, one["id"], timeout=300)
        assert single["status"] == "succeeded", single["error"]
        assert "shards" not in single["summary"] and single["params"]["shard_size"] == 1_000_000

        a, b = _scores(client, sharded["id"]), _scores(client, one["id"])
        assert a.shape == b.shape == (6000,)
        # the same Fisher labels; float32 statistics summed in another order
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
        assert final["damping"] == pytest.approx(single["damping"], rel=1e-5)
        flags = all_pages(client, f"/v1/audits/{sharded['id']}/flags", limit=500)
        assert len(flags) == 600 and flags[0]["index"] == int(np.argmax(a))
    # the shard rows go with the audit's end (their partial files become garbage)
    engine = _database(two_workers)
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT count(*) FROM audit_shard")).scalar() == 0
    engine.dispose()


def test_folds_run_as_a_task_per_fold_on_both_workers(two_workers, tmp_path):
    """Method `folds` shards by fold whatever the dataset's size: the audit's own process and the idle
    worker each unlearn some folds, and the joined out-of-fold scores equal the engine's one-process
    loop run here on the same exported model (each fold is seeded by its index alone)."""
    inputs, labels = synthetic_classification(n=4000, features=32, classes=5, seed=13)
    labels[:200] = (labels[:200] + 1) % 5  # some wrong labels for the folds to find
    with two_workers.client() as client:
        m, d, path = _mlp_and_data(client, inputs, labels, tmp_path, epochs=40)
        body = {"model_id": m["id"], "dataset_id": d["id"], "method": "folds", "seed": 3, "fold_epochs": 6}
        audit = client.post("/v1/audits", json=body).json()
        final, seen = wait_for_audit(client, audit["id"], timeout=300)
        assert final["status"] == "succeeded", (final["error"], two_workers.logs()[-4000:])
        shards = final["summary"]["shards"]
        assert shards["kind"] == "folds" and shards["num_shards"] == 5 and shards["shard_runs"] == 5, shards
        if two_workers.kind == "postgres_redis":  # Redis hands the announced folds out at once
            assert len(shards["shards_per_process"]) >= 2, shards
        assert any("of 5 done" in (stage or "") for _, stage, _ in seen)  # progress counts folds
        scores = _scores(client, audit["id"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_onnx(path)
        reference = run_audit(loaded.module, torch.from_numpy(inputs), torch.from_numpy(labels),
                              AuditConfig(method="folds", seed=3, fold_epochs=6))
    finally:
        torch.set_num_threads(threads)
    # the same float32 arithmetic in both; the scores are float64 probabilities of float32 logits
    np.testing.assert_allclose(scores, reference.scores.numpy(), rtol=0, atol=1e-6)
    per_fold = final["summary"]["out_of_sample"]["per_fold"]
    assert per_fold == reference.summary["out_of_sample"]["per_fold"]


def _database(service):
    url = service.env.get("PBRF_DATABASE_URL") or f"sqlite:///{service.data_dir / 'pbrf-audit.db'}"
    return sqlalchemy.create_engine(url)


def test_a_killed_shard_is_run_again_alone(two_workers, tmp_path):
    """SIGKILL the worker process running a shard (as the OOM killer would): that shard is claimed
    again (its process is gone) and the audit succeeds; no other shard runs twice. On Redis only: the
    filesystem broker's polling hands the second worker its first shard after the audit's own worker
    has taken most of them."""
    if two_workers.kind != "postgres_redis":
        pytest.skip("needs a broker that delivers the announced shards at once")
    inputs, labels = synthetic_classification(n=12000, features=64, classes=5, seed=12)
    model = quick_mlp(inputs, labels, hidden=256, epochs=10)
    path = export_onnx(model, torch.from_numpy(inputs[:2]), tmp_path / "m.onnx")
    engine = _database(two_workers)
    try:
        with two_workers.client() as client:
            m = upload_model(client, path).json()
            d = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
            audit = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "ekfac",
                                                    "batch_size": 250, "shard_size": 1000}).json()
            audit_key = audit["id"] if two_workers.kind == "postgres_redis" else audit["id"].replace("-", "")
            kills, deadline = 0, time.monotonic() + 120
            while kills == 0 and time.monotonic() < deadline:
                owner = client.get(f"/v1/audits/{audit['id']}").json()["worker"]
                with engine.connect() as connection:
                    running = connection.execute(sqlalchemy.text(
                        "SELECT id, worker, claim_token FROM audit_shard WHERE status = 'running' AND audit_id = :a"),
                        {"a": audit_key}).all()
                if not owner:
                    continue
                owner_pid = int(owner.rsplit(":", 1)[1])
                for shard_id, worker, token in running:
                    pid = int(worker.rsplit(":", 1)[1])
                    try:
                        parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                    except OSError:
                        continue
                    if owner_pid in (pid, parent):
                        continue  # the audit's own process: killing it would restart the audit
                    os.kill(pid, signal.SIGKILL)  # the other worker's process, mid-shard
                    time.sleep(0.3)
                    with engine.connect() as connection:
                        status, now = connection.execute(sqlalchemy.text(
                            "SELECT status, claim_token FROM audit_shard WHERE id = :i"), {"i": shard_id}).one()
                    # it may have finished just before the signal: then it was not killed mid-shard
                    kills += not (status == "succeeded" and now == token)
                    break
                time.sleep(0.02)
            assert kills == 1, "no shard could be killed on the second worker process"
            final, _ = wait_for_audit(client, audit["id"], timeout=300)
            assert final["status"] == "succeeded", (final["error"], two_workers.logs()[-4000:])
            shards = final["summary"]["shards"]
            assert shards["num_shards"] == 15  # 11 of 1000, then 4 of 250
            assert shards["shard_runs"] == 3 * 15 + kills, shards  # every shard once, the killed one twice
            assert final["attempts"] == 1  # the audit itself was never restarted
    finally:
        engine.dispose()
