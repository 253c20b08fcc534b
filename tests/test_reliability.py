"""Crash and cancellation behaviour with real worker processes on both brokers: SIGKILL of the
process running an audit, cooperative cancellation, and that results are written exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest
import torch

from tests.conftest import Service, _service_env, fresh_postgres_database
from tests.helpers import (all_pages, assert_problem, export_onnx, npz_bytes, quick_mlp, synthetic_classification,
                           upload_dataset, upload_model, wait_for_audit)


# Long enough that recovery by a stale heartbeat cannot be mistaken for recovery by the dead-process
# check, which is what the SIGKILL test is about; wall-clock margins stay wide on a loaded CI machine.
STALE_AFTER = 60


@pytest.fixture(scope="module", params=["embedded", "postgres_redis"])
def fast_reaper_service(request, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(fresh_postgres_database()) if request.param == "postgres_redis" else None
        env = _service_env(request.param, pg) | {
            "PBRF_STALE_AFTER_SECONDS": str(STALE_AFTER), "PBRF_REAPER_INTERVAL_SECONDS": "1",
            "PBRF_HEARTBEAT_SECONDS": "0.5", "PBRF_MAX_ACTIVE_AUDITS_PER_TENANT": "2", "PBRF_GARBAGE_GRACE_SECONDS": "2"}
        svc = Service(env, tmp_path_factory.mktemp(f"reaper-{request.param}"))
        svc.start()
        yield svc
        svc.stop()


@pytest.fixture(scope="module")
def slow_job(fast_reaper_service, tmp_path_factory):
    """A model and dataset whose exact audit with batch size 2 takes several seconds."""
    inputs, labels = synthetic_classification(n=2400, features=4, classes=3, seed=5)
    model = quick_mlp(inputs, labels, hidden=5)
    path = export_onnx(model, torch.from_numpy(inputs[:2]), tmp_path_factory.mktemp("slow") / "m.onnx")
    with fast_reaper_service.client() as client:
        m = upload_model(client, path).json()
        d = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
    return {"model_id": m["id"], "dataset_id": d["id"], "method": "exact", "batch_size": 2}


def _wait_running(client, audit_id, min_progress=0.1, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/audits/{audit_id}").json()
        if body["status"] == "running" and body["progress"] >= min_progress:
            return body
        assert body["status"] in ("queued", "running"), body
        time.sleep(0.05)
    raise AssertionError("the audit never got going")


def test_sigkill_mid_audit_is_recovered_and_written_once(fast_reaper_service, slow_job):
    with fast_reaper_service.client() as client:
        audit = client.post("/v1/audits", json=slow_job).json()
        running = _wait_running(client, audit["id"])
        pid = int(running["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)  # the pool process running the audit, as the OOM killer would
        killed_at = time.monotonic()
        while client.get(f"/v1/audits/{audit['id']}").json()["attempts"] < 2:
            # The dead pool process is recognised (Redis: by the redelivered message or the reaper, whichever
            # is first; filesystem broker: by the reaper, after Celery replaces its lost child in ~10 s), so
            # a second attempt starts long before the heartbeat could go stale.
            assert time.monotonic() - killed_at < STALE_AFTER - 10, "recovery waited for the stale heartbeat"
            time.sleep(0.05)
        final, seen = wait_for_audit(client, audit["id"], timeout=180)
        # (the reason first: a dict repr in pytest's message gets cut before `error`)
        assert final["status"] == "succeeded", (final["error"], final["attempts"], final["worker"],
                                                list(dict.fromkeys(seen))[-12:],
                                                fast_reaper_service.logs()[-6000:])
        assert final["attempts"] == 2
        flags = all_pages(client, f"/v1/audits/{audit['id']}/flags", limit=1000)
        assert [f["rank"] for f in flags] == list(range(1, 241))
        assert len({f["index"] for f in flags}) == 240
        scores = client.get(f"/v1/audits/{audit['id']}/scores", params={"limit": 10000}).json()["items"]
        assert len(scores) == 2400


def test_a_killed_folds_audit_keeps_the_folds_it_finished(fast_reaper_service, slow_job):
    """Method folds records each fold as a shard row: SIGKILL the worker after two folds are done, and
    the second attempt runs only the folds that were not; the scores equal an uninterrupted run's."""
    body = slow_job | {"method": "folds", "batch_size": None, "fold_epochs": 40, "seed": 2}
    with fast_reaper_service.client() as client:
        audit = client.post("/v1/audits", json=body).json()
        deadline = time.monotonic() + 120
        while True:
            running = client.get(f"/v1/audits/{audit['id']}").json()
            assert running["status"] in ("queued", "running") and time.monotonic() < deadline, running
            if running["status"] == "running" and (running["stage"] or "").startswith("folds: 2 of 5 done"):
                break
            time.sleep(0.05)
        os.kill(int(running["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        final, seen = wait_for_audit(client, audit["id"], timeout=240)
        assert final["status"] == "succeeded", (final["error"], list(dict.fromkeys(seen))[-12:],
                                                fast_reaper_service.logs()[-6000:])
        assert final["attempts"] == 2
        # the two finished folds ran once; the one running when the process died ran twice at most
        assert 5 <= final["summary"]["shards"]["shard_runs"] <= 6, final["summary"]["shards"]
        again = client.post("/v1/audits", json=body).json()
        uninterrupted, _ = wait_for_audit(client, again["id"], timeout=240)
        assert uninterrupted["status"] == "succeeded" and uninterrupted["attempts"] == 1
        assert uninterrupted["summary"]["shards"]["shard_runs"] == 5
        scores = [r["score"] for r in all_pages(client, f"/v1/audits/{audit['id']}/scores", limit=10_000)]
        reference = [r["score"] for r in all_pages(client, f"/v1/audits/{again['id']}/scores", limit=10_000)]
        assert len(scores) == 2400 and scores == reference  # the same folds, seeded alike, in the same processes


def test_cancel_stops_a_running_audit(fast_reaper_service, slow_job):
    with fast_reaper_service.client() as client:
        audit = client.post("/v1/audits", json=slow_job).json()
        _wait_running(client, audit["id"], min_progress=0.05)
        r = client.post(f"/v1/audits/{audit['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert_problem(client.post(f"/v1/audits/{audit['id']}/cancel"), 409, "audit-finished")
        assert_problem(client.get(f"/v1/audits/{audit['id']}/flags"), 409, "audit-not-succeeded")
        # the worker notices at a batch boundary and is free for the next job within seconds
        quick = client.post("/v1/audits", json=slow_job | {"method": "identity", "batch_size": 512}).json()
        started = time.monotonic()
        final, _ = wait_for_audit(client, quick["id"], timeout=60)
        assert final["status"] == "succeeded" and time.monotonic() - started < 30
        body = client.get(f"/v1/audits/{audit['id']}").json()
        assert body["status"] == "cancelled" and body["summary"] is None


def test_cancel_a_queued_audit_never_runs(fast_reaper_service, slow_job):
    with fast_reaper_service.client() as client:
        first = client.post("/v1/audits", json=slow_job).json()
        second = client.post("/v1/audits", json=slow_job).json()
        assert client.post(f"/v1/audits/{second['id']}/cancel").json()["status"] == "cancelled"
        client.post(f"/v1/audits/{first['id']}/cancel")
        time.sleep(3)
        body = client.get(f"/v1/audits/{second['id']}").json()
        assert body["status"] == "cancelled" and body["attempts"] == 0 and body["started_at"] is None


def test_a_tenant_over_its_active_audit_quota_gets_429_until_one_ends(fast_reaper_service, slow_job):
    with fast_reaper_service.client() as client:
        first = client.post("/v1/audits", json=slow_job).json()
        second = client.post("/v1/audits", json=slow_job).json()
        before = len(client.get("/v1/audits").json()["items"])
        over = client.post("/v1/audits", json=slow_job)
        assert_problem(over, 429, "too-many-active-audits")
        assert int(over.headers["Retry-After"]) > 0
        assert len(client.get("/v1/audits").json()["items"]) == before  # nothing was created
        client.post(f"/v1/audits/{first['id']}/cancel")
        third = client.post("/v1/audits", json=slow_job)
        assert third.status_code == 202
        for audit in (second, third.json()):
            client.post(f"/v1/audits/{audit['id']}/cancel")


def test_delete_refuses_what_is_in_use_and_removes_the_rest_with_its_stored_bytes(fast_reaper_service, slow_job,
                                                                                  tmp_path_factory):
    inputs, labels = synthetic_classification(n=120, features=4, classes=3, seed=11)
    path = export_onnx(quick_mlp(inputs, labels, hidden=6), torch.from_numpy(inputs[:2]),
                       tmp_path_factory.mktemp("delete") / "m.onnx")
    store = fast_reaper_service.data_dir / "artifacts"
    # a model whose weights live in an external-data part: the collector must keep that part too
    big = export_onnx(quick_mlp(inputs, labels, hidden=64), torch.from_numpy(inputs[:2]),
                      tmp_path_factory.mktemp("external") / "m.onnx", external_data=True)
    with fast_reaper_service.client() as client:
        with_parts = client.post("/v1/models", files=[
            ("file", ("m.onnx", big.read_bytes())),
            ("external_data", ("m.onnx.data", (big.parent / "m.onnx.data").read_bytes()))]).json()
        model = upload_model(client, path).json()
        dataset = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
        done, _ = wait_for_audit(client, client.post("/v1/audits", json={
            "model_id": model["id"], "dataset_id": dataset["id"], "method": "identity"}).json()["id"], timeout=60)
        assert done["status"] == "succeeded"

        # in use: a queued or running audit keeps its audit, model and dataset
        slow = client.post("/v1/audits", json=slow_job).json()
        assert_problem(client.delete(f"/v1/audits/{slow['id']}"), 409, "audit-active")
        assert_problem(client.delete(f"/v1/models/{slow_job['model_id']}"), 409, "model-in-use")
        assert_problem(client.delete(f"/v1/datasets/{slow_job['dataset_id']}"), 409, "dataset-in-use")
        client.post(f"/v1/audits/{slow['id']}/cancel")

        assert client.delete(f"/v1/audits/{done['id']}").status_code == 204
        assert_problem(client.get(f"/v1/audits/{done['id']}"), 404, "not-found")
        assert_problem(client.delete(f"/v1/audits/{done['id']}"), 404, "not-found")
        again, _ = wait_for_audit(client, client.post("/v1/audits", json={
            "model_id": model["id"], "dataset_id": dataset["id"], "method": "identity"}).json()["id"], timeout=60)
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204  # takes its finished audit along
        assert_problem(client.get(f"/v1/audits/{again['id']}"), 404, "not-found")
        assert client.delete(f"/v1/models/{model['id']}").status_code == 204
        assert_problem(client.get(f"/v1/models/{model['id']}"), 404, "not-found")
        assert client.get(f"/v1/models/{slow_job['model_id']}").status_code == 200  # others untouched

        # the worker's collector removes the bytes nothing refers to any more (grace 2 s here)
        gone = {model["sha256"], dataset["sha256"]}
        deadline = time.monotonic() + 30
        while any((store / sha[:2] / sha).exists() for sha in gone) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any((store / sha[:2] / sha).exists() for sha in gone)
        kept = client.get(f"/v1/models/{slow_job['model_id']}").json()["sha256"]
        assert (store / kept[:2] / kept).exists()
        part = with_parts["external_data"][0]["sha256"]
        assert (store / part[:2] / part).exists()


def _slow_forward_model(path, convolutions: int = 40):
    """A valid ONNX model (740k weights) whose forward pass over a batch of 256 64x64 images takes tens of
    seconds (one 3x3 64-channel kernel applied 40 times) while two examples pass validation quickly:
    the shape of a time bomb that cooperative cancellation at batch boundaries cannot stop."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((64, 4, 3, 3)) * 0.1).astype(np.float32), "K0"),
               numpy_helper.from_array((rng.standard_normal((64, 64, 3, 3)) * 0.02).astype(np.float32), "K"),
               numpy_helper.from_array(rng.standard_normal((3, 64)).astype(np.float32), "W")]
    nodes, current = [helper.make_node("Conv", ["x", "K0"], ["c"], pads=[1, 1, 1, 1])], "c"
    for i in range(convolutions):
        nodes.append(helper.make_node("Conv", [current, "K"], [f"c{i}"], pads=[1, 1, 1, 1]))
        current = f"c{i}"
    nodes += [helper.make_node("GlobalAveragePool", [current], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("Gemm", ["flat", "W"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_cancel_stops_an_audit_inside_one_long_forward_pass(fast_reaper_service, slow_job, tmp_path):
    """Each attempt runs in a child process that the worker kills on cancel: a model whose single forward
    pass takes tens of seconds no longer holds the worker until its batch ends; the next audit (another
    tenant's, say) starts within seconds."""
    path = _slow_forward_model(tmp_path / "bomb.onnx")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((256, 4, 64, 64)).astype(np.float32)
    with fast_reaper_service.client() as client:
        model = upload_model(client, path).json()
        dataset = upload_dataset(client, npz_bytes(inputs=images, labels=rng.integers(0, 3, 256))).json()
        bomb = client.post("/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                               "method": "identity", "batch_size": 256}).json()
        _wait_running(client, bomb["id"], min_progress=0.0)
        time.sleep(2)  # inside the first forward pass by now
        assert client.post(f"/v1/audits/{bomb['id']}/cancel").json()["status"] == "cancelled"
        cancelled_at = time.monotonic()
        quick = client.post("/v1/audits", json=slow_job | {"method": "identity", "batch_size": 512}).json()
        final, _ = wait_for_audit(client, quick["id"], timeout=120)
        assert final["status"] == "succeeded"
        # the bomb's forward alone takes well over 20 s on this machine; its batch would end later still
        assert time.monotonic() - cancelled_at < 20, "the worker finished the cancelled audit's batch first"
        assert client.get(f"/v1/audits/{bomb['id']}").json()["status"] == "cancelled"
