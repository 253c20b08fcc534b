"""The Python client (app.client), the CLI's client commands and a client generated from /openapi.json,
against the real service (`pbrf-audit serve`: HTTP, a Celery worker process, a broker; tests/conftest.py).

A small digits MLP (scikit-learn's digits, 10% of the labels flipped) exported with torch's default ONNX
export, which writes the weights to an external-data file beside the model, so every upload here sends
the model with its `external_data` part."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from app.client import (Audit, AuditClient, Conflict, Flag, NotFound, Score, ValidationFailed)
from tests.conftest import free_port
from tests.digits import noisy_digits, train_mlp
from tests.helpers import export_onnx, overflowing_mlp

ROOT = Path(__file__).resolve().parent.parent
CLI = [str(Path(sys.executable).with_name("pbrf-audit"))]
TRAIN_SIZE = 600


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Files as a user has them: digits-mlp.onnx + digits-mlp.onnx.data, and digits.npz."""
    folder = tmp_path_factory.mktemp("digits")
    x, y_noisy, _y_true, flipped, _, _ = noisy_digits(seed=0, noise=0.1, train_size=TRAIN_SIZE)
    model = train_mlp(x, y_noisy, hidden=16, epochs=150, seed=0)
    onnx_path = export_onnx(model, torch.from_numpy(x[:4]), folder / "digits-mlp.onnx", external_data=True)
    weights = folder / "digits-mlp.onnx.data"
    assert weights.exists() and weights.stat().st_size > 64 * 16 * 4
    data_path = folder / "digits.npz"
    np.savez(data_path, inputs=x, labels=y_noisy)
    return {"model": onnx_path, "weights": weights, "data": data_path, "labels": y_noisy, "flipped": flipped}


@pytest.fixture
def api(service):
    with AuditClient(service.url) as client:
        yield client


def test_client_full_flow(api, service, digits, tmp_path):
    """Upload (with external data) -> audit (idempotent start) -> wait with progress -> every flag and score
    across pages -> CSV -> verdicts -> corrected labels."""
    model = api.upload_model(digits["model"], external_data=[digits["weights"]], name="digits-mlp")
    assert model.num_parameters == 64 * 16 + 16 + 16 * 10 + 10 and model.num_outputs == 10
    assert [part.name for part in model.external_data] == ["digits-mlp.onnx.data"]
    dataset = api.upload_dataset(digits["data"])
    assert (dataset.num_examples, dataset.num_classes) == (TRAIN_SIZE, 10)
    assert api.get_model(model).sha256 == model.sha256 and model.id in {m.id for m in api.list_models()}
    assert api.get_dataset(dataset.id).label_counts == dataset.label_counts
    assert "loo" in api.methods().methods

    key = f"client-{uuid.uuid4()}"
    started = api.start_audit(model, dataset, "loo", idempotency_key=key, curvature="ekfac")
    assert api.start_audit(model, dataset, "loo", idempotency_key=key, curvature="ekfac").id == started.id
    # its results do not exist yet: 409 with the API's Retry-After and where to poll
    with pytest.raises(Conflict) as unfinished:
        api.flags_page(started)
    assert unfinished.value.slug == "audit-not-succeeded" and unfinished.value.retry_after == 2.0
    assert f"/v1/audits/{started.id}" in unfinished.value.detail

    seen: list[tuple] = []
    final = api.wait_for_audit(started, timeout=180, on_progress=lambda a: seen.append((a.status, a.stage, a.progress)))
    assert isinstance(final, Audit) and final.status == "succeeded", (final, service.logs()[-3000:])
    assert seen[-1] == ("succeeded", "done", 1.0)
    progress = [p for _, _, p in seen]
    assert progress == sorted(progress), seen
    assert started.id in {a.id for a in api.list_audits()}

    flags = list(api.iter_flags(final, page_size=7))
    assert len(flags) == final.summary["num_flagged"] > 7 and all(isinstance(f, Flag) for f in flags)
    assert [f.rank for f in flags] == list(range(1, len(flags) + 1))
    assert flags == list(api.iter_flags(final.id, page_size=1000))
    assert all(f.given_label == digits["labels"][f.index] for f in flags)
    assert digits["flipped"][[f.index for f in flags]].mean() > 0.3  # the audit finds flipped labels

    scores = list(api.iter_scores(final, page_size=250))
    assert [s.index for s in scores] == list(range(TRAIN_SIZE)) and isinstance(scores[0], Score)
    rows = list(csv.DictReader(io.StringIO(api.scores_csv(final))))
    assert len(rows) == TRAIN_SIZE and float(rows[17]["score"]) == pytest.approx(scores[17].score)
    downloaded = api.download_scores_csv(final, tmp_path / "scores.csv")
    assert downloaded.read_bytes().decode() == api.scores_csv(final)
    flag_rows = list(csv.DictReader(open(api.write_flags_csv(final, tmp_path / "flags.csv"))))
    assert [int(r["index"]) for r in flag_rows] == [f.index for f in flags]

    # review: the top flag is mislabeled (its suggestion), the next one is correct; then corrected labels
    top = next(f for f in flags if f.suggested_label != f.given_label)
    kept = next(f for f in flags if f.index != top.index)
    verdict = api.put_verdict(final, top.index, "mislabeled")
    assert (verdict.index, verdict.corrected_label, verdict.verdict_by) == (top.index, top.suggested_label, None)
    api.put_verdict(final, kept.index, "correct")
    api.put_verdict(final, flags[-1].index, "unsure")
    api.delete_verdict(final, flags[-1].index)
    listed = {f.index: f for f in api.iter_flags(final)}
    assert (listed[top.index].verdict, listed[kept.index].verdict, listed[flags[-1].index].verdict) == \
        ("mislabeled", "correct", None)

    changes = api.label_changes(dataset)
    assert [(c.index, c.label, c.original_label) for c in changes.changes] == \
        [(top.index, top.suggested_label, top.given_label)]
    expected = digits["labels"].copy()
    expected[top.index] = top.suggested_label
    exported = api.export_labels(dataset, tmp_path / "labels.csv")
    assert exported.changed_examples == 1
    assert [int(r["label"]) for r in csv.DictReader(open(exported.path))] == expected.tolist()
    with np.load(api.export_labels(dataset, tmp_path / "labels.npz").path, allow_pickle=False) as npz:
        assert npz["labels"].tolist() == expected.tolist()
        assert npz["original_labels"].tolist() == digits["labels"].tolist()


def test_client_typed_exceptions(api, service, digits):
    missing = uuid.uuid4()
    with pytest.raises(NotFound) as found:
        api.get_dataset(missing)
    assert found.value.type == "https://pbrf-audit.dev/problems/not-found" and str(missing) in found.value.detail
    assert found.value.status == 404 and found.value.body["status"] == 404
    with pytest.raises(ValidationFailed) as invalid:
        api.start_audit(missing, missing, "ekfac", flag_fraction=2)
    assert "flag_fraction" in invalid.value.detail and invalid.value.errors
    with pytest.raises(ValidationFailed) as verdict:
        api.put_verdict(missing, 0, "wrong")  # type: ignore[arg-type]
    assert verdict.value.errors[0]["loc"][-1] == "verdict"


# ------------------------------------------------------------------------------------------- the CLI
def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PBRF_SERVER", "PBRF_API_KEY")}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=environment | {"OMP_NUM_THREADS": "1", "COLUMNS": "120"} | (env or {}))


@pytest.mark.parametrize("service", ["embedded"], indirect=True)
def test_cli_audit_json_then_status_flags_and_export(service, digits, tmp_path):
    done = _cli("audit", "--model", str(digits["model"]), "--external-data", str(digits["weights"]),
                "--data", str(digits["data"]), "--method", "loo", "--param", "curvature=ekfac",
                "--param", "flag_fraction=0.05", "--top", "5", "--json", env={"PBRF_SERVER": service.url})
    assert done.returncode == 0, (done.stdout, done.stderr, service.logs()[-3000:])
    result = json.loads(done.stdout)  # stdout holds the JSON only: progress and messages went to stderr
    audit, flags = result["audit"], result["flags"]
    assert audit["status"] == "succeeded" and audit["params"]["flag_fraction"] == 0.05
    assert [f["rank"] for f in flags] == [1, 2, 3, 4, 5] and all("suggested_label" in f for f in flags)
    assert "succeeded: done 100%" in done.stderr and f"audit {audit['id']}" in done.stderr

    status = _cli("status", audit["id"], "--server", service.url, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["summary"] == audit["summary"]
    listed = _cli("flags", audit["id"], "--server", service.url, "--json", "--limit", "3")
    assert listed.returncode == 0 and json.loads(listed.stdout) == flags[:3]
    table = _cli("flags", audit["id"], "--server", service.url, "--limit", "3")
    assert table.returncode == 0 and "suggested label" in table.stdout
    assert str(flags[0]["index"]) in table.stdout

    out = tmp_path / "corrected.csv"
    exported = _cli("export", audit["dataset_id"], "--out", str(out), env={"PBRF_SERVER": service.url})
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(open(out)))
    assert [int(r["original_label"]) for r in rows] == digits["labels"].tolist()
    as_npz = _cli("export", audit["dataset_id"], "--out", str(tmp_path / "labels.bin"), "--format", "npz",
                  "--server", service.url)
    assert as_npz.returncode == 0, as_npz.stderr
    with np.load(tmp_path / "labels.bin", allow_pickle=False) as npz:
        assert npz["labels"].shape == (TRAIN_SIZE,)


@pytest.mark.parametrize("service", ["embedded"], indirect=True)
def test_cli_failures_exit_non_zero_with_a_readable_message(service, tmp_path):
    # an audit that fails: a built-in MLP whose weights overflow float32 on the data
    overflowing_mlp(tmp_path / "weights.safetensors")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", inputs=rng.normal(size=(60, 5)).astype(np.float32),
             labels=rng.integers(0, 3, size=60))
    arch = json.dumps({"type": "mlp", "input_size": 5, "hidden_sizes": [4], "num_classes": 3})
    failed = _cli("audit", "--model", str(tmp_path / "weights.safetensors"), "--architecture", arch,
                  "--data", str(tmp_path / "data.npz"), "--server", service.url, "--json")
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert json.loads(failed.stdout)["audit"]["status"] == "failed" and json.loads(failed.stdout)["flags"] == []
    assert "failed" in failed.stderr and "outputs" in failed.stderr and "Traceback" not in failed.stderr

    # a problem+json answer: its type and detail, exit 3
    missing = str(uuid.uuid4())
    problem = _cli("status", missing, "--server", service.url)
    assert problem.returncode == 3 and problem.stdout == ""
    assert "https://pbrf-audit.dev/problems/not-found" in problem.stderr and missing in problem.stderr
    refused = _cli("audit", "--model", str(tmp_path / "weights.safetensors"), "--data", str(tmp_path / "data.npz"),
                   "--server", service.url)  # safetensors without an architecture
    assert refused.returncode == 3 and "detail:" in refused.stderr and "Traceback" not in refused.stderr

    # no server there: exit 4
    gone = _cli("status", missing, "--server", f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 4 and "could not talk to the server" in gone.stderr
    # a usage error (typer): exit 2
    assert _cli("audit", "--model", str(tmp_path / "nope.onnx"), "--data", str(tmp_path / "data.npz")).returncode == 2


# ------------------------------------------------------------------ a client generated from /openapi.json
@pytest.mark.parametrize("service", ["embedded"], indirect=True)
def test_a_generated_client_works_end_to_end(service, digits, tmp_path):
    """openapi-python-client, a standard generator, reads the live server's document (with warnings
    failing the run) and the client it writes uploads, audits and lists flags."""
    import httpx

    document = tmp_path / "openapi.json"
    document.write_text(httpx.get(service.url + "/openapi.json", timeout=30).text)
    config = tmp_path / "generator.yaml"
    config.write_text("post_hooks: []\n")  # no ruff run after generating
    generator = Path(sys.executable).with_name("openapi-python-client")
    done = subprocess.run([str(generator), "generate", "--path", str(document), "--output-path",
                           str(tmp_path / "pbrf_generated"), "--meta", "none", "--config", str(config),
                           "--fail-on-warning"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    sys.path.insert(0, str(tmp_path))
    try:
        from pbrf_generated.api.audits import (create_audit_v1_audits_post, get_audit_v1_audits_audit_id_get,
                                               list_flags_v1_audits_audit_id_flags_get)
        from pbrf_generated.api.datasets import upload_dataset_v1_datasets_post
        from pbrf_generated.api.models import upload_model_v1_models_post
        from pbrf_generated.client import Client
        from pbrf_generated.models import (AuditCreate, AuditCreateMethod, AuditOut, BodyUploadDatasetV1DatasetsPost,
                                           BodyUploadModelV1ModelsPost, DatasetOut, FlagPage, ModelOut, Problem)
        from pbrf_generated.types import File

        client = Client(base_url=service.url, timeout=httpx.Timeout(120.0), raise_on_unexpected_status=True)
        with open(digits["model"], "rb") as onnx, open(digits["weights"], "rb") as weights:
            model = upload_model_v1_models_post.sync(client=client, body=BodyUploadModelV1ModelsPost(
                file=File(payload=onnx, file_name="digits-mlp.onnx"),
                external_data=[File(payload=weights, file_name="digits-mlp.onnx.data")], name="generated"))
        assert isinstance(model, ModelOut), model
        with open(digits["data"], "rb") as data:
            dataset = upload_dataset_v1_datasets_post.sync(client=client, body=BodyUploadDatasetV1DatasetsPost(
                file=File(payload=data, file_name="digits.npz")))
        assert isinstance(dataset, DatasetOut) and dataset.num_examples == TRAIN_SIZE, dataset

        created = create_audit_v1_audits_post.sync_detailed(client=client, body=AuditCreate(
            model_id=model.id, dataset_id=dataset.id, method=AuditCreateMethod.EKFAC))
        assert created.status_code == 202 and isinstance(created.parsed, AuditOut), created.content
        assert created.headers["location"] == f"/v1/audits/{created.parsed.id}"
        # polled as documented: Retry-After while queued or running
        with AuditClient(service.url) as api:
            assert api.wait_for_audit(created.parsed.id, timeout=180).status == "succeeded"
        audit = get_audit_v1_audits_audit_id_get.sync(client=client, audit_id=created.parsed.id)
        assert isinstance(audit, AuditOut) and audit.status.value == "succeeded" and audit.model_id == model.id

        page = list_flags_v1_audits_audit_id_flags_get.sync(client=client, audit_id=audit.id, limit=5)
        assert isinstance(page, FlagPage) and [f.rank for f in page.items] == [1, 2, 3, 4, 5]
        assert isinstance(page.next_cursor, str)
        # an error answer parses as the documented Problem
        missing = get_audit_v1_audits_audit_id_get.sync(client=client, audit_id=uuid.uuid4())
        assert isinstance(missing, Problem) and missing.status == 404 and missing.type_.endswith("/not-found")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "pbrf_generated" or m.startswith("pbrf_generated.")]:
            del sys.modules[name]
