"""The whole slice through the real HTTP app, a real worker process and a real broker, on both
backends: embedded (SQLite + filesystem://) and PostgreSQL + Redis."""

from __future__ import annotations

import csv
import io
import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import (all_pages, assert_problem, export_onnx, npz_bytes, overflowing_mlp, quick_mlp,
                           synthetic_classification, upload_dataset, upload_model, wait_for_audit)
from tests.zoo import TinyTransformer, token_classification, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    inputs, labels = synthetic_classification(n=1200, features=6, classes=3)
    model = quick_mlp(inputs, labels, hidden=8)
    path = export_onnx(model, torch.from_numpy(inputs[:4]), tmp_path_factory.mktemp("m") / "mlp.onnx")
    return inputs, labels, model, path


def test_health_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}
    schema = client.get("/openapi.json").json()
    for path in ("/v1/models", "/v1/datasets", "/v1/audits", "/v1/audits/{audit_id}", "/v1/audits/{audit_id}/flags",
                 "/v1/audits/{audit_id}/scores", "/v1/audits/{audit_id}/cancel", "/healthz", "/readyz"):
        assert path in schema["paths"], path
    assert "404" in schema["paths"]["/v1/audits/{audit_id}"]["get"]["responses"]
    assert client.get("/docs").status_code == 200
    assert "pbrf_http_requests_total" in client.get("/metrics").text


def test_audit_end_to_end(client, trained, service):
    inputs, labels, model, onnx_path = trained
    r = upload_model(client, onnx_path, name="mlp")
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["format"] == "onnx" and m["input_shape"] == [6] and m["num_outputs"] == 3
    assert m["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert client.get(f"/v1/models/{m['id']}").json()["sha256"] == m["sha256"]

    r = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels))
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["num_examples"] == 1200 and d["num_classes"] == 3 and d["input_shape"] == [6]

    r = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "exact",
                                        "batch_size": 16})
    assert r.status_code == 202, r.text
    audit = r.json()
    assert r.headers["location"] == f"/v1/audits/{audit['id']}"
    # the answer shows the row as it is now: a free worker may already have claimed it
    assert audit["status"] in ("queued", "running") and audit["damping"] is None
    final, seen = wait_for_audit(client, audit["id"])
    assert final["status"] == "succeeded", (final, service.logs()[-3000:])
    statuses = [s for s, _, _ in seen]
    assert "running" in statuses, seen[:5]
    running = [(stage, p) for s, stage, p in seen if s == "running"]
    assert any(0 < p < 1 for _, p in running) and {"ggn", "scores"} & {stage for stage, _ in running}
    progress = [p for s, _, p in seen if s in ("queued", "running")]
    assert progress == sorted(progress), "progress went backwards"
    assert final["progress"] == 1.0 and final["damping"] > 0 and final["damping_requested"] is None
    assert final["summary"]["num_examples"] == 1200 and final["summary"]["num_flagged"] == 120
    assert final["started_at"] and final["finished_at"] and final["attempts"] == 1

    # flags: keyset pages, most suspicious first
    flags = all_pages(client, f"/v1/audits/{audit['id']}/flags", limit=50)
    assert [f["rank"] for f in flags] == list(range(1, 121))
    scores = [f["score"] for f in flags]
    assert scores == sorted(scores, reverse=True)
    for f in flags[:10]:
        assert f["given_label"] == labels[f["index"]]
    with torch.no_grad():
        predicted = model(torch.from_numpy(inputs)).argmax(1).numpy()
    assert all(f["predicted_label"] == predicted[f["index"]] for f in flags)

    # scores: every example in dataset order, JSON pages and CSV
    items = all_pages(client, f"/v1/audits/{audit['id']}/scores", limit=500)
    assert [i["index"] for i in items] == list(range(1200))
    by_index = {i["index"]: i["score"] for i in items}
    assert all(by_index[f["index"]] == f["score"] for f in flags)
    assert min(f["score"] for f in flags) >= sorted(by_index.values(), reverse=True)[119]
    r = client.get(f"/v1/audits/{audit['id']}/scores", headers={"Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 1200 and float(rows[5]["score"]) == pytest.approx(by_index[5])

    # the identity baseline runs through the same path
    r = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "identity"})
    final, _ = wait_for_audit(client, r.json()["id"])
    assert final["status"] == "succeeded" and final["damping"] is None


def test_safetensors_model_and_failed_job(client, tmp_path):
    inputs, labels = synthetic_classification(n=90, features=5, classes=3, seed=1)
    # a built-in MLP whose output size (2) is smaller than the label range (3): refused at creation
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    arch = {"type": "mlp", "input_size": 5, "hidden_sizes": [4], "num_classes": 2}
    r = upload_model(client, path, architecture=json.dumps(arch))
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "safetensors" and r.json()["num_parameters"] == 5 * 4 + 4 + 4 * 2 + 2
    d = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
    assert_problem(client.post("/v1/audits", json={"model_id": r.json()["id"], "dataset_id": d["id"]}), 422,
                   "model-dataset-mismatch")
    # one whose weights overflow float32 on real inputs (finite at the upload's zero-input smoke test):
    # only the job can see it, and it must fail readably
    overflowing = overflowing_mlp(tmp_path / "overflow.safetensors")
    r = upload_model(client, overflowing, architecture=json.dumps(dict(arch, num_classes=3)))
    assert r.status_code == 201, r.text
    audit = client.post("/v1/audits", json={"model_id": r.json()["id"], "dataset_id": d["id"]}).json()
    final, _ = wait_for_audit(client, audit["id"])
    assert final["status"] == "failed"
    assert "outputs are not finite" in final["error"] and "Traceback" not in final["error"], final["error"]
    assert_problem(client.get(f"/v1/audits/{audit['id']}/flags"), 409, "audit-not-succeeded")


def test_default_onnx_export_with_external_data_uploads_and_audits(client, tmp_path):
    """torch.onnx.export's default writes m.onnx and m.onnx.data; both go up in one request, the model
    record lists the part, and the worker loads it for the audit."""
    inputs, labels = synthetic_classification(n=60, features=5, classes=3, seed=2)
    model = quick_mlp(inputs, labels, hidden=64)  # 5 x 64 weights: above the exporter's 1 kB inline threshold
    path = export_onnx(model, torch.from_numpy(inputs[:2]), tmp_path / "m.onnx", external_data=True)
    data = (tmp_path / "m.onnx.data").read_bytes()
    r = client.post("/v1/models", files=[("file", ("m.onnx", path.read_bytes())),
                                         ("external_data", ("m.onnx.data", data))])
    assert r.status_code == 201, r.text
    created = r.json()
    assert len(data) > 0 and created["num_parameters"] == 5 * 64 + 64 + 64 * 3 + 3
    assert [(p["name"], p["size_bytes"]) for p in created["external_data"]] == [("m.onnx.data", len(data))]
    assert client.get(f"/v1/models/{created['id']}").json()["external_data"] == created["external_data"]
    d = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
    audit = client.post("/v1/audits", json={"model_id": created["id"], "dataset_id": d["id"],
                                            "method": "identity"}).json()
    final, _ = wait_for_audit(client, audit["id"])
    assert final["status"] == "succeeded", final
    assert final["summary"]["num_examples"] == 60


def test_transformer_on_token_ids_with_a_padding_mask_uploads_and_audits(client, tmp_path):
    """A text classifier with two graph inputs (input_ids, attention_mask), exported with torch's defaults
    (external data), audits from an .npz holding one int64 array per input name; the records say what
    the model takes and what the dataset holds, and a dataset that does not fit is refused at creation
    with the mismatch named, before any audit row exists."""
    ids, mask, labels = token_classification(48, seed=3)
    model = train(TinyTransformer(), (torch.from_numpy(ids), torch.from_numpy(mask)), torch.from_numpy(labels),
                  epochs=40)
    path = export_onnx(model, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), tmp_path / "t.onnx",
                       external_data=True)
    r = client.post("/v1/models", files=[("file", ("t.onnx", path.read_bytes())),
                                         ("external_data", ("t.onnx.data", (tmp_path / "t.onnx.data").read_bytes()))])
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert [(i["name"], i["dtype"], i["shape"], i["vocab_size"]) for i in created["inputs"]] == [
        ("input_ids", "int64", [16], 64), ("attention_mask", "int64", [16], None)]
    dataset = upload_dataset(client, npz_bytes(input_ids=ids, attention_mask=mask, labels=labels)).json()
    assert [(i["name"], i["dtype"], i["shape"]) for i in dataset["inputs"]] == [
        ("input_ids", "int64", [16]), ("attention_mask", "int64", [16])]
    assert dataset["inputs"][0]["range"] == [int(ids.min()), int(ids.max())]
    audit = client.post("/v1/audits", json={"model_id": created["id"], "dataset_id": dataset["id"],
                                            "method": "ekfac"}).json()
    final, _ = wait_for_audit(client, audit["id"])
    assert final["status"] == "succeeded", final
    assert final["summary"]["num_examples"] == 48 and final["summary"]["num_flagged"] > 0

    bad = {"dataset-inputs-mismatch": npz_bytes(inputs=ids, labels=labels),
           "input-dtype-mismatch": npz_bytes(input_ids=ids.astype(np.float32), attention_mask=mask, labels=labels),
           "input-out-of-range": npz_bytes(input_ids=ids + 64, attention_mask=mask, labels=labels)}
    for slug, content in bad.items():
        d = upload_dataset(client, content).json()
        problem = assert_problem(client.post("/v1/audits", json={"model_id": created["id"], "dataset_id": d["id"]}),
                                 422, slug)
        assert "input_ids" in problem["detail"]
        recent = client.get("/v1/audits", params={"limit": 500}).json()["items"]  # newest first
        assert not [a for a in recent if a["dataset_id"] == d["id"]]


def test_a_one_logit_binary_classifier_is_audited_and_refuses_more_classes(client, service, tmp_path):
    """A BCEWithLogits model exported with one output: the record says 1 output, a dataset with labels
    0 and 1 audits (the summary says how the logit was read), one with a third class is a 422."""
    inputs, labels = synthetic_classification(n=300, features=6, classes=2, seed=3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels).float()
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
        optimiser.step()
    m = upload_model(client, export_onnx(model.eval(), x[:4], tmp_path / "binary.onnx")).json()
    assert m["num_outputs"] == 1 and m["num_parameters"] == 65
    d = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
    r = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "ekfac"})
    assert r.status_code == 202, r.text
    body, _ = wait_for_audit(client, r.json()["id"], timeout=120)
    assert body["status"] == "succeeded", body
    assert "binary classifier" in body["summary"]["model_output"]
    assert body["summary"]["num_examples"] == 300
    three = upload_dataset(client, npz_bytes(inputs=inputs[:3], labels=np.array([0, 1, 2]))).json()
    problem = assert_problem(client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": three["id"],
                                                             "method": "ekfac"}), 422,
                             "model-dataset-mismatch")
    assert "binary" in problem["detail"]


def test_unknown_ids_and_bad_requests(client, trained):
    missing = "00000000-0000-4000-8000-000000000000"
    assert_problem(client.get(f"/v1/audits/{missing}"), 404, "not-found")
    assert_problem(client.get(f"/v1/models/{missing}"), 404, "not-found")
    assert_problem(client.post("/v1/audits", json={"model_id": missing, "dataset_id": missing}), 404, "not-found")
    assert_problem(client.get("/v1/audits/not-a-uuid"), 422, "validation-error")
    assert_problem(client.post("/v1/audits", json={"model_id": 3}), 422, "validation-error")
    _, _, _, onnx_path = trained
    m = upload_model(client, onnx_path).json()
    d = upload_dataset(client, npz_bytes(inputs=np.zeros((4, 7), np.float32), labels=np.zeros(4, np.int64))).json()
    assert_problem(client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"]}), 422,
                   "model-dataset-mismatch")
    five = upload_dataset(client, npz_bytes(inputs=np.zeros((4, 6), np.float32), labels=np.array([0, 1, 2, 4]))).json()
    assert_problem(client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": five["id"], "method": "ekfac"}),
                   422, "model-dataset-mismatch")  # labels up to 4, three outputs: refused before it queues
    d_ok = upload_dataset(client, npz_bytes(inputs=np.zeros((4, 6), np.float32), labels=np.zeros(4, np.int64))).json()
    assert_problem(client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d_ok["id"], "method": "magic"}),
                   422, "unknown-method")
    assert_problem(client.get(f"/v1/audits/{missing}/flags", params={"cursor": "zzz"}), 404)
    # methods whose cost the request already shows to be out of reach are refused at creation
    big = export_onnx(torch.nn.Sequential(torch.nn.Linear(6, 2000), torch.nn.Tanh(), torch.nn.Linear(2000, 3)),
                      torch.zeros(2, 6), onnx_path.parent / "big.onnx")
    m_big = upload_model(client, big).json()
    assert m_big["num_parameters"] > 12_000
    assert_problem(client.post("/v1/audits", json={"model_id": m_big["id"], "dataset_id": d_ok["id"], "method": "exact"}),
                   422, "model-too-large-for-method")


def test_every_method_through_the_worker(client, tmp_path):
    inputs, labels = synthetic_classification(n=200, features=4, classes=3, seed=2)
    model = quick_mlp(inputs, labels, hidden=6)
    path = export_onnx(model, torch.from_numpy(inputs[:2]), tmp_path / "m.onnx")
    m = upload_model(client, path).json()
    d = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
    methods = client.get("/v1/methods").json()
    assert methods["default"] == "folds"
    assert {"exact", "identity", "diagonal", "kfac", "ekfac", "lanczos", "cg"} <= set(methods["methods"])
    created = {}
    for method in ("ekfac", "kfac", "diagonal", "lanczos", "cg", "loo", "folds"):
        body = {"model_id": m["id"], "dataset_id": d["id"], "method": method, "lanczos_rank": 8, "fold_epochs": 3}
        if method == "ekfac":
            body["verify_top_k"] = 3
        r = client.post("/v1/audits", json=body)
        assert r.status_code == 202, r.text
        created[method] = r.json()["id"]
    # the default method is folds (the best measured, bench/results/detection.md), with its own size floor
    default = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"]}).json()
    assert default["method"] == "folds" and default["params"]["fold_shrink"] == 0.5
    tiny = upload_dataset(client, npz_bytes(inputs=inputs[:6], labels=labels[:6])).json()
    problem = assert_problem(client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": tiny["id"]}), 422,
                             "dataset-too-small-for-method")
    assert "at least 10 examples" in problem["detail"]
    folds_id = created.pop("folds")
    for method, audit_id in created.items():
        final, _ = wait_for_audit(client, audit_id)
        assert final["status"] == "succeeded", (method, final["error"])
        assert final["damping"] > 0
        assert final["summary"]["estimator"]["estimator"] == (method if method != "loo" else "ekfac")
        items = client.get(f"/v1/audits/{audit_id}/scores", params={"limit": 1000}).json()["items"]
        assert len(items) == 200 and all(i["score"] > 0 for i in items)
    loo = client.get(f"/v1/audits/{created['loo']}").json()
    assert loo["summary"]["method"] == "loo" and "confident learning" in loo["summary"]["flag_rule"]
    flags = client.get(f"/v1/audits/{created['loo']}/flags").json()["items"]
    assert flags and all(f["suggested_label"] in (0, 1, 2) and 0 <= f["out_of_sample_given_probability"] <= 1
                         for f in flags)
    row = client.get(f"/v1/audits/{created['loo']}/scores", params={"limit": 1}).json()["items"][0]
    assert row["suggested_label"] is not None and row["self_influence"] > 0
    verification = client.get(f"/v1/audits/{created['ekfac']}").json()["summary"]["verification"]
    assert verification["num_examples"] == 3 and len(verification["items"]) == 3
    assert {"pearson", "spearman", "epsilon", "damping"} <= verification.keys()
    layers = client.get(f"/v1/audits/{created['ekfac']}").json()["summary"]["estimator"]["layers"]
    assert all(layer["treatment"] == "ekfac" for layer in layers) and len(layers) == 2
    # fold unlearning: no curvature, out-of-fold probabilities, confident-learning flags with suggestions
    folds, _ = wait_for_audit(client, folds_id)
    assert folds["status"] == "succeeded", folds["error"]
    assert folds["damping"] is None and folds["summary"]["method"] == "folds"
    assert folds["params"]["folds"] == 5 and folds["params"]["fold_epochs"] == 3
    out_of_fold = folds["summary"]["out_of_sample"]
    assert out_of_fold["layer_reset"] and sum(f["examples"] for f in out_of_fold["per_fold"]) == 200
    assert all(f["epochs_run"] <= 3 for f in out_of_fold["per_fold"])
    shards = folds["summary"]["shards"]  # a task per fold, on whichever worker takes it
    assert shards["kind"] == "folds" and shards["num_shards"] == 5 and shards["shard_runs"] == 5, shards
    flags = all_pages(client, f"/v1/audits/{folds_id}/flags")
    assert len(flags) == folds["summary"]["num_flagged"]
    assert all(f["suggested_label"] in (0, 1, 2) and 0 <= f["out_of_sample_given_probability"] <= 1 for f in flags)
    rows = client.get(f"/v1/audits/{folds_id}/scores", params={"limit": 1000}).json()["items"]
    assert len(rows) == 200 and all(0 <= r["score"] <= 1 and r["self_influence"] is None for r in rows)
    wait_for_audit(client, default["id"])


def test_a_list_of_datasets_stays_small_however_many_classes_they_have(client):
    """One dataset whose label 2000 gives it 2001 label counts: listed without them (a page of 500 such
    records at 100k classes was 100 MB), fetched alone with them."""
    created = upload_dataset(client, b"f1,label\n1.0,2000\n0.5,0\n", filename="wide.csv").json()
    assert len(created["label_counts"]) == 2001
    listed = next(d for d in client.get("/v1/datasets", params={"limit": 500}).json() if d["id"] == created["id"])
    assert listed["label_counts"] is None and listed["num_classes"] == 2001
    alone = client.get(f"/v1/datasets/{created['id']}").json()
    assert alone["label_counts"][2000] == 1 and alone["label_counts"][0] == 1 and sum(alone["label_counts"]) == 2
    small = upload_dataset(client, b"f1,label\n1.0,1\n0.5,0\n", filename="small.csv").json()
    listed = next(d for d in client.get("/v1/datasets").json() if d["id"] == small["id"])
    assert listed["label_counts"] == [1, 1]


def test_a_second_audit_with_the_same_curvature_settings_scores_with_the_stored_fit(client, trained, service):
    """An ekfac audit stores its fitted curvature (safetensors in the artifact store); another audit of the
    same model and dataset with the same fitting settings scores with it, with no fitting pass, and gets
    the same scores, whatever its flag rule; other settings fit their own; the stored fit outlives the
    audit that made it while a later audit uses it."""
    inputs, labels, _, onnx_path = trained
    m = upload_model(client, onnx_path).json()
    d = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
    job = {"model_id": m["id"], "dataset_id": d["id"], "method": "ekfac", "damping": 0.01}

    def run(**extra):
        final, _ = wait_for_audit(client, client.post("/v1/audits", json=job | extra).json()["id"], timeout=120)
        assert final["status"] == "succeeded", final["error"]
        return final

    def scores(audit):
        return [item["score"] for item in all_pages(client, f"/v1/audits/{audit['id']}/scores", limit=1000)]

    first = run()
    stored = first["summary"]["curvature"]
    assert stored["reused_from_audit"] is None and stored["size_bytes"] > 0
    assert (service.data_dir / "artifacts" / stored["sha256"][:2] / stored["sha256"]).exists()
    second = run(flag_fraction=0.05)
    assert second["summary"]["curvature_reused"] and second["summary"]["curvature"]["reused_from_audit"] == first["id"]
    assert second["summary"]["curvature"]["sha256"] == stored["sha256"]
    assert scores(second) == pytest.approx(scores(first), rel=1e-6)
    assert second["summary"]["num_flagged"] == 60
    other = run(damping=0.1)
    assert other["summary"]["curvature"]["reused_from_audit"] is None
    assert other["summary"]["curvature"]["sha256"] != stored["sha256"]

    assert client.delete(f"/v1/audits/{first['id']}").status_code == 204
    third = run()
    assert third["summary"]["curvature"]["reused_from_audit"] == second["id"]
    assert third["summary"]["curvature"]["sha256"] == stored["sha256"]


@pytest.mark.parametrize("method", ["ekfac", "exact"])
def test_attributions_rank_the_training_examples_behind_each_query(client, trained, service, method):
    """POST /v1/audits/{id}/attributions with a query set: 202 + Location; the job uses the audit's
    stored curvature (blockwise, or the exact GGN's Cholesky factor); each query that copies one of the
    audit's top flags finds that training example first among the helpful; pages in query order;
    refusals name the problem and store nothing."""
    inputs, labels, _, onnx_path = trained
    m = upload_model(client, onnx_path).json()
    d = upload_dataset(client, npz_bytes(inputs=inputs, labels=labels)).json()
    audit, _ = wait_for_audit(client, client.post("/v1/audits", json={
        "model_id": m["id"], "dataset_id": d["id"], "method": method}).json()["id"], timeout=120)
    assert audit["status"] == "succeeded" and audit["summary"]["curvature"]["size_bytes"] > 0
    top = [f["index"] for f in client.get(f"/v1/audits/{audit['id']}/flags", params={"limit": 3}).json()["items"]]
    query = npz_bytes(inputs=inputs[top], labels=labels[top])
    r = client.post(f"/v1/audits/{audit['id']}/attributions", files={"file": ("q.npz", query)}, data={"top_k": "4"})
    assert r.status_code == 202, r.text
    created = r.json()
    assert r.headers["location"] == f"/v1/attributions/{created['id']}" and created["num_queries"] == 3
    deadline = time.monotonic() + 120
    while (body := client.get(r.headers["location"]).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert body["status"] == "succeeded", body["error"]
    first = client.get(f"/v1/attributions/{created['id']}/queries", params={"limit": 2}).json()
    rest = client.get(f"/v1/attributions/{created['id']}/queries",
                      params={"limit": 2, "cursor": first["next_cursor"]}).json()
    items = first["items"] + rest["items"]
    assert [q["query_index"] for q in items] == [0, 1, 2] and rest["next_cursor"] is None
    assert [q["helpful"][0]["index"] for q in items] == top
    for q in items:
        assert len(q["helpful"]) == 4 and len(q["harmful"]) == 4
        assert [h["score"] for h in q["helpful"]] == sorted((h["score"] for h in q["helpful"]), reverse=True)

    # a finished attribution cannot be cancelled; another one is cancelled while queued or running (or,
    # if the worker was quicker, has finished: then the cancel says so), and is deleted with its results
    assert_problem(client.post(f"/v1/attributions/{created['id']}/cancel"), 409, "attribution-finished")
    other = client.post(f"/v1/audits/{audit['id']}/attributions", files={"file": ("q.npz", query)}).json()
    cancelled = client.post(f"/v1/attributions/{other['id']}/cancel")
    if cancelled.status_code == 200:
        assert cancelled.json()["status"] == "cancelled"
        assert_problem(client.get(f"/v1/attributions/{other['id']}/queries"), 409, "attribution-not-succeeded")
    else:
        assert_problem(cancelled, 409, "attribution-finished")
    assert client.delete(f"/v1/attributions/{other['id']}").status_code == 204
    assert_problem(client.get(f"/v1/attributions/{other['id']}"), 404, "not-found")

    # refusals: an audit that stored no curvature, queries the model cannot take, an unknown audit
    identity, _ = wait_for_audit(client, client.post("/v1/audits", json={
        "model_id": m["id"], "dataset_id": d["id"], "method": "identity"}).json()["id"], timeout=120)
    assert_problem(client.post(f"/v1/audits/{identity['id']}/attributions", files={"file": ("q.npz", query)}),
                   422, "audit-without-curvature")
    wrong = npz_bytes(inputs=np.zeros((2, 5), np.float32), labels=np.zeros(2, np.int64))
    assert_problem(client.post(f"/v1/audits/{audit['id']}/attributions", files={"file": ("q.npz", wrong)}),
                   422, "model-dataset-mismatch")
    assert_problem(client.post("/v1/audits/00000000-0000-4000-8000-000000000000/attributions",
                               files={"file": ("q.npz", query)}), 404, "not-found")
    # deleting the audit takes its attribution along
    assert client.delete(f"/v1/audits/{audit['id']}").status_code == 204
    assert_problem(client.get(f"/v1/attributions/{created['id']}"), 404, "not-found")
