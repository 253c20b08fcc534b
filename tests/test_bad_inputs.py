"""Bad uploads get a specific 4xx problem+json and leave no file and no row behind."""

from __future__ import annotations

import io
import json
import os
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import assert_problem, export_onnx, npz_bytes, upload_dataset


def _store_files(service):
    root = service.data_dir / "var" if (service.data_dir / "var").exists() else service.data_dir
    return sorted(p for p in (root / "artifacts").rglob("*") if p.is_file()) if (root / "artifacts").exists() else []


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/pbrf-pwned",))


BAD_DATASETS = [
    ("garbage.npz", b"this is not a zip archive", 422, "invalid-npz"),
    ("objects.npz", npz_bytes(inputs=np.array([{"a": 1}, None], dtype=object), labels=np.array([0, 1])), 422,
     "dataset-object-arrays"),
    ("negative.npz", npz_bytes(inputs=np.zeros((3, 2), np.float32), labels=np.array([0, -1, 1])), 422, "labels-out-of-range"),
    ("float-labels.npz", npz_bytes(inputs=np.zeros((3, 2), np.float32), labels=np.array([0.0, 1.5, 1.0])), 422,
     "labels-not-integers"),
    ("mismatch.npz", npz_bytes(inputs=np.zeros((10, 2), np.float32), labels=np.zeros(9, np.int64)), 422, "dataset-shape"),
    ("nan.npz", npz_bytes(inputs=np.array([[0.0, np.nan]], np.float32), labels=np.array([0])), 422, "dataset-non-finite"),
    ("strings.npz", npz_bytes(inputs=np.array([["a", "b"]]), labels=np.array([0])), 422, "dataset-dtype"),
    ("missing.npz", npz_bytes(x=np.zeros((3, 2), np.float32)), 422, "invalid-npz"),
    ("huge-uint64-ids.npz", npz_bytes(inputs=np.full((2, 3), 2**63 + 5, np.uint64), labels=np.zeros(2, np.int64)), 422,
     "dataset-dtype"),
    ("data.pkl", pickle.dumps(_Boom()), 415, "unsupported-dataset-format"),
    ("ragged.csv", b"f1,f2,label\n1,2,0\n3,1\n", 422, "csv-ragged"),
    ("nolabel.csv", b"f1,f2\n1,2\n", 422, "csv-no-label"),
]


@pytest.mark.parametrize("filename,content,status,slug", BAD_DATASETS, ids=[b[0] for b in BAD_DATASETS])
def test_bad_dataset_rejected_without_side_effects(client, service, filename, content, status, slug):
    before_rows = len(client.get("/v1/datasets").json())
    before_files = _store_files(service)
    assert_problem(upload_dataset(client, content, filename), status, slug)
    assert len(client.get("/v1/datasets").json()) == before_rows
    assert _store_files(service) == before_files


def test_dataset_that_does_not_fit_the_model_is_refused_before_an_audit_exists(client, tmp_path):
    """Integer inputs (raw uint8 pixels) for a float model, and float values for an integer input, are
    refused when the audit is created, naming the input and the fix; no audit row is left."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    m = client.post("/v1/models", files={"file": ("m.onnx", export_onnx(model, torch.zeros(2, 4),
                                                                         tmp_path / "m.onnx").read_bytes())}).json()
    pixels = upload_dataset(client, npz_bytes(inputs=np.full((6, 4), 200, np.uint8), labels=np.zeros(6, np.int64))).json()
    assert pixels["inputs"] == [{"name": "inputs", "dtype": "int64", "shape": [4], "range": [200, 200],
                                 "vocab_size": None}]
    problem = assert_problem(client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": pixels["id"]}),
                             422, "input-dtype-mismatch")
    assert "float" in problem["detail"] and "int64" in problem["detail"]
    recent = client.get("/v1/audits", params={"limit": 500}).json()["items"]
    assert not [a for a in recent if a["dataset_id"] == pixels["id"]]


def test_zip_bomb_npz_rejected_before_inflating(client, service):
    buffer = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32))
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        # 320 MB of zeros as inputs (over the test services' 256 MB limit): well under 1 MB compressed
        with archive.open("inputs.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x01\x00" + b"\x76\x00" + repr(header | {"shape": (80 * 1024**2, 1)}).encode().ljust(117) + b"\n")
            chunk = b"\0" * (64 * 1024 * 1024)
            for _ in range(5):
                f.write(chunk)
        archive.writestr("labels.npy", npz_bytes(labels=np.zeros(1, np.int64)))
    assert len(buffer.getvalue()) < 2 * 1024 * 1024
    before_files = _store_files(service)
    assert_problem(upload_dataset(client, buffer.getvalue(), "bomb.npz"), 413, "dataset-too-large")
    assert _store_files(service) == before_files


BAD_MODELS = [
    ("model.onnx", b"definitely not protobuf \x00\x01", 422, "invalid-onnx"),
    ("model.pt", pickle.dumps(_Boom()), 415, "pickle-model-refused"),
    ("model.pt2", b"PK\x03\x04 torch.export archive", 415, "pickle-model-refused"),
    ("model.h5", b"\x89HDF\r\n", 415, "unsupported-model-format"),
    ("weights.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", 422, "architecture-required"),
]


@pytest.mark.parametrize("filename,content,status,slug", BAD_MODELS, ids=[b[0] for b in BAD_MODELS])
def test_bad_model_rejected(client, service, filename, content, status, slug, tmp_path):
    before_rows = len(client.get("/v1/models").json())
    before_files = _store_files(service)
    r = client.post("/v1/models", files={"file": (filename, content)})
    body = assert_problem(r, status, slug)
    if slug == "pickle-model-refused":
        assert "ONNX" in body["detail"]
    assert len(client.get("/v1/models").json()) == before_rows
    assert _store_files(service) == before_files
    import os
    assert not os.path.exists("/tmp/pbrf-pwned")


EXTERNAL_DATA_CASES = {
    # case: (external_data parts as (file name, which bytes), status, slug)
    "no part for the location": ([], 422, "onnx-external-data-missing"),
    "part named otherwise": ([("weights.bin", "data")], 422, "onnx-external-data-missing"),
    "part name with a directory": ([("sub/m.onnx.data", "data")], 422, "external-data-name"),
    "same part twice": ([("m.onnx.data", "data"), ("m.onnx.data", "data")], 422, "external-data-duplicate"),
    "truncated part": ([("m.onnx.data", "truncated")], 422, "onnx-external-data-range"),
    "a part no tensor uses": ([("m.onnx.data", "data"), ("spare.data", "data")], 422, "onnx-external-data-unused"),
}


@pytest.mark.parametrize("case", EXTERNAL_DATA_CASES, ids=list(EXTERNAL_DATA_CASES))
def test_bad_external_data_rejected(client, service, tmp_path, case):
    """torch.onnx.export's default output (m.onnx + m.onnx.data) with parts that disagree with it."""
    parts, status, slug = EXTERNAL_DATA_CASES[case]
    # weights above the exporter's 1 kB inline threshold, so that they go to m.onnx.data
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    path = export_onnx(model, torch.randn(2, 6), tmp_path / "m.onnx", external_data=True)
    data = (tmp_path / "m.onnx.data").read_bytes()
    contents = {"data": data, "truncated": data[: len(data) // 2]}
    files = [("file", ("m.onnx", path.read_bytes()))]
    files += [("external_data", (name, contents[which])) for name, which in parts]
    before_rows = len(client.get("/v1/models").json())
    before_files = _store_files(service)
    assert_problem(client.post("/v1/models", files=files), status, slug)
    assert len(client.get("/v1/models").json()) == before_rows
    assert _store_files(service) == before_files


CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
ARCH = json.dumps({"type": "mlp", "input_size": 4, "hidden_sizes": [], "num_classes": 3})


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_hostile_corpus_is_rejected_without_side_effects(client, service, entry):
    """Each file in tests/corpus (see make_corpus.py) gets its documented 4xx, leaves no file and no
    row behind, and nothing in it runs (the pickles would create a marker file)."""
    marker = Path("/tmp/pbrf-corpus-pwned")
    marker.unlink(missing_ok=True)
    endpoint = "/v1/models" if entry["kind"] == "model" else "/v1/datasets"
    before_rows = len(client.get(endpoint).json())
    before_files = _store_files(service)
    data = {"architecture": ARCH} if entry["file"].endswith(".safetensors") else {}
    content = (CORPUS / entry["file"]).read_bytes()
    r = client.post(endpoint, files={"file": (entry["file"], content)}, data=data)
    assert_problem(r, entry["status"], entry["slug"])
    assert len(client.get(endpoint).json()) == before_rows
    assert _store_files(service) == before_files
    assert not marker.exists()


def _memory_hog(path: Path, values: int) -> Path:
    """A valid 1 kB ONNX model whose forward pass materialises `values` floats (ConstantOfShape + Add)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(np.ones((4, 3), np.float32), "W"),
                    numpy_helper.from_array(np.array([1, values], np.int64), "shape"),
                    numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("Add", ["big", "big"], ["doubled"]),
             helper.make_node("ReduceSum", ["doubled", "axes"], ["total"], keepdims=1),
             helper.make_node("Add", ["h", "total"], ["y"])]
    graph = helper.make_graph(nodes, "hog", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_model_validation_runs_under_a_memory_limit_and_a_concurrency_cap(tmp_path):
    """A 1 kB graph that allocates 2.4 GB while it runs is refused by the validator's memory limit (it
    used to take whatever it asked for); with every validation slot taken, an upload is told to retry."""
    from app.artifacts.inspect_model import _validation_slot, inspect_in_subprocess
    from app.artifacts.loaders import ArtifactError

    hog = _memory_hog(tmp_path / "hog.onnx", 600_000_000)
    with pytest.raises(ArtifactError) as err:
        inspect_in_subprocess(hog, "onnx", None, 120, memory_bytes=256 * 1024**2)
    assert err.value.slug == "model-memory-limit" and "PBRF_MODEL_VALIDATION_MEMORY_BYTES" in err.value.detail
    slot = _validation_slot(2)
    assert slot.acquire(timeout=1) and slot.acquire(timeout=1)
    try:
        with pytest.raises(ArtifactError) as err:
            inspect_in_subprocess(hog, "onnx", None, 120, wait_seconds=0.1)
        assert err.value.slug == "validator-busy" and err.value.status == 503
    finally:
        slot.release()
        slot.release()


def test_dataset_parsing_runs_under_a_concurrency_cap(tmp_path, monkeypatch):
    """Each dataset parse may take up to PBRF_MAX_DATASET_BYTES; several at once used to add up without
    bound in the API process. With PBRF_MAX_CONCURRENT_DATASET_PARSES parses in flight, an upload (and a
    read of CSV rows, which parses the file whole) waits, then gets 503 `dataset-parser-busy` with
    Retry-After; reading rows of an .npz parses nothing and goes on; a freed slot lets the next one in."""
    import threading
    import uuid
    from contextlib import ExitStack

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.artifacts import service
    from app.artifacts.loaders import ArtifactError
    from app.artifacts.service import create_dataset, dataset_examples, dataset_parse_slot, load_uploaded_dataset
    from app.artifacts.tables import DatasetArtifact
    from app.audits.review import dataset_labels
    from app.core.config import Settings
    from app.core.db import Base
    from app.core.errors import ProblemError
    from app.core.storage import ArtifactStore

    monkeypatch.setattr(service, "DATASET_PARSE_WAIT_SECONDS", 1.0)  # 10 s in the server
    settings = Settings(data_dir=tmp_path, max_concurrent_dataset_parses=2)
    store = ArtifactStore(tmp_path / "artifacts")
    store.ensure()
    content = npz_bytes(inputs=np.zeros((4, 2), np.float32), labels=np.array([0, 1, 0, 1]))
    (tmp_path / "d.npz").write_bytes(content)
    csv_sha, npz_sha = store.put_bytes(b"a,b,label\n1,2,0\n3,4,1\n"), store.put_bytes(content)
    rows = {fmt: DatasetArtifact(id=uuid.uuid4(), tenant_id="t", name="d", format=fmt, sha256=sha, size_bytes=1,
                                 num_examples=2, num_classes=2, input_shape=[2], label_counts=[1, 1])
            for fmt, sha in (("csv", csv_sha), ("npz", npz_sha))}
    engine = create_engine(f"sqlite:///{tmp_path / 'parse.db'}")
    Base.metadata.create_all(engine)
    with ExitStack() as busy:
        held = [busy.enter_context(ExitStack()) for _ in range(2)]
        for stack in held:
            stack.enter_context(dataset_parse_slot(settings))  # two parses in flight
        with pytest.raises(ArtifactError) as err:
            load_uploaded_dataset(tmp_path / "d.npz", "npz", settings, wait_seconds=0.1)
        assert err.value.slug == "dataset-parser-busy" and err.value.status == 503
        assert "PBRF_MAX_CONCURRENT_DATASET_PARSES" in err.value.detail
        started = time.monotonic()
        with Session(engine) as session, pytest.raises(ProblemError) as problem:
            create_dataset(session=session, store=store, settings=settings, tenant_id="t",
                           source=io.BytesIO(content), filename="d.npz", name=None)
        assert time.monotonic() - started >= 1  # it waited for a slot before answering
        assert problem.value.status == 503 and problem.value.slug == "dataset-parser-busy"
        assert problem.value.headers and "Retry-After" in problem.value.headers
        with pytest.raises(ProblemError) as problem:
            dataset_examples(store, settings, rows["csv"], [1])
        assert problem.value.status == 503 and problem.value.slug == "dataset-parser-busy"
        assert dataset_examples(store, settings, rows["npz"], [1])[1][1][1] == 1  # row reads parse nothing
        with Session(engine) as session, pytest.raises(ProblemError) as problem:  # GET .../labels parses it whole
            dataset_labels(session, store, settings, rows["npz"], corrected=False)
        assert problem.value.status == 503 and problem.value.slug == "dataset-parser-busy"

        done = []
        waiting = threading.Thread(target=lambda: done.append(load_uploaded_dataset(tmp_path / "d.npz", "npz",
                                                                                    settings, wait_seconds=5)))
        waiting.start()
        time.sleep(0.3)
        assert not done  # still waiting for a slot
        held[0].close()  # one parse ends
        waiting.join(10)
        assert done and done[0].num_examples == 4
    assert load_uploaded_dataset(tmp_path / "d.npz", "npz", settings).num_examples == 4
    assert dataset_labels(None, store, settings, rows["npz"], corrected=False).labels.tolist() == [0, 1, 0, 1]


def _slow_model(path: Path, convolutions: int = 100) -> Path:
    """A valid 150 kB ONNX model whose smoke forward pass takes many seconds on one core (64-channel
    3x3 convolutions over a fixed 256x256 input, one shared weight) while holding little memory."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array((rng.standard_normal((64, 64, 3, 3)) * 0.01).astype(np.float32), "K"),
                    numpy_helper.from_array(rng.standard_normal((3, 64)).astype(np.float32), "W")]
    nodes, current = [], "x"
    for i in range(convolutions):
        nodes.append(helper.make_node("Conv", [current, "K"], [f"c{i}"], pads=[1, 1, 1, 1]))
        current = f"c{i}"
    nodes += [helper.make_node("GlobalAveragePool", [current], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "W"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, 256, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _validator_processes(svc) -> list[int]:
    """The validator server and its forked children in a service's process group."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == svc.process.pid and \
                    b"app.artifacts.validator_server" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ProcessLookupError):
            pass
    return found


def test_model_validation_runs_isolated_under_a_time_limit(tmp_path):
    """Conversion and the smoke forward pass run in a child of the validator server; one that overruns
    is refused and killed, and the next upload is validated as usual."""
    from tests.conftest import Service, _service_env
    from tests.helpers import export_onnx, quick_mlp, synthetic_classification, upload_model

    svc = Service(_service_env("embedded", None) | {"PBRF_MODEL_VALIDATION_TIMEOUT_SECONDS": "1"}, tmp_path / "svc")
    svc.start()
    try:
        inputs, labels = synthetic_classification(n=20, features=4, classes=3)
        path = export_onnx(quick_mlp(inputs, labels, hidden=3, epochs=1), torch.from_numpy(inputs[:2]), tmp_path / "m.onnx")
        with svc.client() as c:
            assert_problem(upload_model(c, _slow_model(tmp_path / "slow.onnx")), 422, "model-validation-timeout")
            assert c.get("/v1/models").json() == []
            deadline = time.monotonic() + 30
            while len(_validator_processes(svc)) > 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(_validator_processes(svc)) == 1, "the overrunning validation was left running"
            assert upload_model(c, path).status_code == 201
    finally:
        svc.stop()


def test_invented_http_methods_do_not_grow_the_metrics(client):
    """/metrics is unauthenticated: its label values come from fixed sets, so requests with made-up
    methods (and unmatched paths) fold into `other` / `unmatched` instead of one series each."""
    for i in range(20):
        client.request(f"BREW{i}", f"/nothing/{i}")
    text = client.get("/metrics").text
    assert "BREW" not in text and "/nothing/" not in text
    assert 'method="other"' in text


@pytest.mark.parametrize("name", ["a\x00b", "tab\there", "\x1b[31mred", "   "])
def test_names_with_control_characters_are_refused_before_anything_is_stored(client, service, name):
    before = _store_files(service)
    r = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(inputs=np.zeros((2, 2), np.float32),
                                                                      labels=np.zeros(2, np.int64)))},
                    data={"name": name})
    assert_problem(r, 422, "invalid-name")
    assert _store_files(service) == before


def test_a_file_name_with_a_nul_is_cleaned_not_stored_raw(client):
    r = client.post("/v1/datasets", files={"file": ("bad\x00name.npz", npz_bytes(inputs=np.zeros((2, 2), np.float32),
                                                                                labels=np.zeros(2, np.int64)))})
    assert r.status_code == 201, r.text
    assert "\x00" not in r.json()["name"] and r.json()["name"].endswith(".npz")


def test_deleting_a_model_while_an_audit_is_created_from_it_is_never_a_server_error(client, service, tmp_path):
    """The race used to end in 500 'FOREIGN KEY constraint failed' in 5 of 8 rounds; now each request
    either wins or gets a 409/404 that names no SQL."""
    from concurrent.futures import ThreadPoolExecutor

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    path = export_onnx(model, torch.zeros(2, 4), tmp_path / "m.onnx")
    d = upload_dataset(client, npz_bytes(inputs=np.zeros((4, 4), np.float32), labels=np.zeros(4, np.int64))).json()
    seen = set()
    with ThreadPoolExecutor(2) as pool:
        for _ in range(6):
            m = client.post("/v1/models", files={"file": ("m.onnx", path.read_bytes())}).json()
            create = pool.submit(client.post, "/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"],
                                                                  "method": "identity"})
            delete = pool.submit(client.delete, f"/v1/models/{m['id']}")
            for response in (create.result(), delete.result()):
                seen.add(response.status_code)
                logs = service.logs()
                assert response.status_code in (202, 204, 404, 409), response.text + logs[logs.rfind("Traceback"):][:4000]
                assert "SQL" not in response.text and "INSERT" not in response.text
    assert seen & {202, 204}


def test_audit_parameters_that_would_exhaust_the_worker_are_priced_at_creation(client, tmp_path):
    """lanczos_rank=2048 on a 361k-parameter model (2 x 2048 x P float64 = 11.8 GB) used to kill the worker
    three times before the audit was 'lost'; now it is refused up front with the estimate and the budget,
    and the same audit at the default rank is accepted."""
    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.ReLU(), torch.nn.Linear(600, 3))
    m = client.post("/v1/models", files={"file": ("m.onnx", export_onnx(model, torch.zeros(2, 600),
                                                                         tmp_path / "m.onnx").read_bytes())}).json()
    d = upload_dataset(client, npz_bytes(inputs=np.zeros((8, 600), np.float32), labels=np.arange(8) % 3)).json()
    body = {"model_id": m["id"], "dataset_id": d["id"], "method": "lanczos", "lanczos_rank": 2048}
    problem = assert_problem(client.post("/v1/audits", json=body), 422, "audit-over-memory-budget")
    assert "Lanczos basis" in problem["detail"] and "PBRF_WORKER_MEMORY_BYTES" in problem["detail"]
    accepted = client.post("/v1/audits", json=body | {"lanczos_rank": 8})
    assert accepted.status_code == 202, accepted.text
    client.post(f"/v1/audits/{accepted.json()['id']}/cancel")
