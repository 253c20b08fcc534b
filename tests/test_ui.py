"""The review page's server side, in process (Starlette's TestClient on a migrated SQLite database, two
tenants' static keys): GET /v1/datasets/{id}/examples (values as audited, tenant isolation, the caps, out of
range), GET /v1/audits/{id}/scores/histogram, and the page and its assets (CSP header, nothing from another
origin, nothing inline, no HTML built from strings). The browser test is tests/test_review_page.py."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.helpers import assert_problem, in_process_app, npz_bytes

ACME, GLOBEX = "acme-ui-secret-0123456789", "globex-ui-secret-0123456789"
UI_DIR = Path(__file__).resolve().parent.parent / "app" / "ui" / "static"
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(30, 3, 5, 4), dtype=np.uint8)  # uint8 pixels: int64 once loaded
LABELS = (np.arange(30) % 4).astype(np.int64)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with in_process_app(tmp_path_factory.mktemp("ui"), f"acme:{ACME},globex:{GLOBEX}") as (application, _):
        yield {name: TestClient(application, headers={"Authorization": f"Bearer {secret}"})
               for name, secret in (("acme", ACME), ("globex", GLOBEX))} | {"anonymous": TestClient(application)}


def _upload(client, content: bytes, filename: str = "data.npz") -> dict:
    r = client.post("/v1/datasets", files={"file": (filename, content)})
    assert r.status_code == 201, r.text
    return r.json()


def _compressed(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _examples(client, dataset_id: str, indices: str):
    return client.get(f"/v1/datasets/{dataset_id}/examples", params={"indices": indices})


@pytest.mark.parametrize("pack", [npz_bytes, _compressed], ids=["stored", "deflated"])
def test_examples_are_the_rows_as_audited(app, pack):
    dataset = _upload(app["acme"], pack(inputs=IMAGES, labels=LABELS))
    r = _examples(app["acme"], dataset["id"], "17, 2,17,29,0")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["num_examples"] == 30 and body["dataset_id"] == dataset["id"]
    assert body["inputs"] == [{"name": "inputs", "dtype": "int64", "shape": [3, 5, 4]}]
    assert [e["index"] for e in body["examples"]] == [17, 2, 29, 0]  # asked order, each once
    for example in body["examples"]:
        i = example["index"]
        assert example["label"] == LABELS[i]
        assert example["inputs"]["inputs"] == IMAGES[i].reshape(-1).astype(int).tolist()


def test_examples_of_csv_and_multi_input_datasets(app):
    rows = "label,a,b,c\n" + "\n".join(f"{i % 2},{i}.5,{-i},{i * 2}" for i in range(12)) + "\n"
    csv_dataset = _upload(app["acme"], rows.encode(), "table.csv")
    body = _examples(app["acme"], csv_dataset["id"], "11,3").json()
    assert body["inputs"] == [{"name": "inputs", "dtype": "float32", "shape": [3]}]
    assert [(e["index"], e["label"], e["inputs"]["inputs"]) for e in body["examples"]] == \
        [(11, 1, [11.5, -11.0, 22.0]), (3, 1, [3.5, -3.0, 6.0])]

    ids = RNG.integers(0, 50, size=(8, 6))
    mask = np.ones((8, 6), dtype=bool)
    features = RNG.normal(size=(8, 2, 2)).astype(np.float32)
    two = _upload(app["acme"], _compressed(input_ids=ids, attention_mask=mask, extra=features,
                                           labels=np.arange(8) % 2))
    body = _examples(app["acme"], two["id"], "5").json()
    assert {s["name"]: (s["dtype"], s["shape"]) for s in body["inputs"]} == \
        {"input_ids": ("int64", [6]), "attention_mask": ("int64", [6]), "extra": ("float32", [2, 2])}
    values = body["examples"][0]["inputs"]
    assert values["input_ids"] == ids[5].tolist() and values["attention_mask"] == [1] * 6
    assert np.allclose(values["extra"], features[5].reshape(-1))


def test_npz_rows_are_read_without_loading_the_arrays(tmp_path, monkeypatch):
    from app.artifacts import loaders

    path = tmp_path / "d.npz"
    path.write_bytes(_compressed(inputs=IMAGES, labels=LABELS))
    monkeypatch.setattr(loaders, "load_dataset", lambda *a, **k: pytest.fail("loaded the whole dataset"))
    arrays, labels = loaders.read_rows(path, "npz", ["inputs"], [1, 4, 28])
    assert arrays["inputs"].dtype == np.int64 and np.array_equal(arrays["inputs"], IMAGES[[1, 4, 28]])
    assert labels.tolist() == LABELS[[1, 4, 28]].tolist()
    # a Fortran-ordered array has no contiguous rows: it is loaded whole (the same loader as the audits)
    fortran = tmp_path / "f.npz"
    fortran.write_bytes(npz_bytes(inputs=np.asfortranarray(RNG.normal(size=(6, 4)).astype(np.float32)),
                                  labels=np.arange(6) % 2))
    with pytest.raises(pytest.fail.Exception):
        loaders.read_rows(fortran, "npz", ["inputs"], [2])


def test_examples_are_tenant_scoped_capped_and_checked(app):
    dataset = _upload(app["acme"], npz_bytes(inputs=RNG.normal(size=(150, 4)).astype(np.float32),
                                             labels=np.arange(150) % 3))
    path = dataset["id"]
    assert_problem(_examples(app["globex"], path, "1"), 404, "not-found")  # another tenant's dataset
    assert_problem(_examples(app["acme"], str(uuid.uuid4()), "1"), 404, "not-found")
    assert_problem(_examples(app["anonymous"], path, "1"), 401, "unauthorized")
    assert_problem(_examples(app["acme"], path, "150"), 404, "example-not-found")
    assert_problem(_examples(app["acme"], path, "3,99999999999"), 404, "example-not-found")
    for bad in ("", "-1", "1,,2", "a", "1.5", "²", "1;2", "9" * 30):
        assert_problem(_examples(app["acme"], path, bad), 422, "validation-error")
    assert_problem(app["acme"].get(f"/v1/datasets/{path}/examples"), 422, "validation-error")
    assert _examples(app["acme"], path, ",".join(map(str, range(100)))).status_code == 200
    assert_problem(_examples(app["acme"], path, ",".join(map(str, range(101)))), 422, "too-many-indices")
    # repeats count once
    assert _examples(app["acme"], path, ",".join(["7"] * 150)).status_code == 200


def test_examples_too_many_values(app, monkeypatch):
    from app.artifacts import service

    dataset = _upload(app["acme"], npz_bytes(inputs=np.zeros((5, 10), np.float32), labels=np.arange(5) % 2))
    monkeypatch.setattr(service, "MAX_EXAMPLE_VALUES", 25)
    body = assert_problem(_examples(app["acme"], dataset["id"], "0,1,2"), 422, "too-many-values")
    assert "at most 2" in body["detail"]
    assert _examples(app["acme"], dataset["id"], "0,1").status_code == 200


def _succeeded_audit(tenant: str, dataset_id: str, scores: np.ndarray, flagged: list[int]) -> str:
    """An audit as a worker leaves it: its scores file in the store and its flag rows."""
    from app.artifacts.tables import ModelArtifact
    from app.audits.tables import Audit, AuditFlag
    from app.core.config import get_settings
    from app.core.db import get_sessionmaker
    from app.core.storage import ArtifactStore

    n = scores.shape[0]
    sha = ArtifactStore(get_settings().storage_dir).put_bytes(npz_bytes(
        score=scores, given_label=np.zeros(n, np.int64), predicted_label=np.zeros(n, np.int64),
        loss=np.zeros(n), given_label_probability=np.ones(n)))
    with get_sessionmaker()() as session:
        model = ModelArtifact(tenant_id=tenant, name="m", format="onnx", sha256="a" * 64, size_bytes=1,
                              num_parameters=9, input_shape=[4], num_outputs=3)
        session.add(model)
        session.flush()
        audit = Audit(tenant_id=tenant, model_id=model.id, dataset_id=uuid.UUID(dataset_id), status="succeeded",
                      method="ekfac", params={}, progress=1.0, stage="done", scores_sha256=sha)
        session.add(audit)
        session.flush()
        session.add_all([AuditFlag(audit_id=audit.id, rank=rank, example_index=i, given_label=0, predicted_label=0,
                                   score=float(scores[i]), loss=0.0, given_label_probability=1.0)
                         for rank, i in enumerate(flagged, start=1)])
        session.commit()
        return str(audit.id)


def test_score_histogram(app):
    dataset = _upload(app["acme"], npz_bytes(inputs=np.zeros((40, 4), np.float32), labels=np.arange(40) % 3))
    linear = np.linspace(0.0, 1.0, 40)
    audit = _succeeded_audit("acme", dataset["id"], linear, [39, 38, 37])
    r = app["acme"].get(f"/v1/audits/{audit}/scores/histogram", params={"bins": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scale"] == "linear" and body["num_examples"] == 40 and body["excluded"] == 0
    assert body["counts"] == [10, 10, 10, 10] and np.allclose(body["edges"], [0, 0.25, 0.5, 0.75, 1])
    assert body["num_flagged"] == 3 and body["flagged_min_score"] == pytest.approx(linear[37])

    heavy = np.concatenate([10.0 ** np.arange(-3, 3, 0.2), [np.nan]])  # heavy-tailed: auto picks log
    audit = _succeeded_audit("acme", dataset["id"], heavy, [])
    body = app["acme"].get(f"/v1/audits/{audit}/scores/histogram", params={"bins": 6}).json()
    assert body["scale"] == "log" and body["excluded"] == 1 and sum(body["counts"]) == 30
    assert body["edges"][0] == pytest.approx(1e-3) and body["num_flagged"] == 0 and body["flagged_min_score"] is None
    body = app["acme"].get(f"/v1/audits/{audit}/scores/histogram", params={"scale": "linear"}).json()
    assert body["scale"] == "linear" and sum(body["counts"]) == 30 and len(body["counts"]) == 50

    assert_problem(app["globex"].get(f"/v1/audits/{audit}/scores/histogram"), 404, "not-found")
    assert_problem(app["acme"].get(f"/v1/audits/{audit}/scores/histogram", params={"bins": 0}), 422)
    assert_problem(app["acme"].get(f"/v1/audits/{audit}/scores/histogram", params={"scale": "cubic"}), 422)


def test_new_endpoints_are_documented(app):
    paths = app["acme"].get("/openapi.json").json()["paths"]
    examples = paths["/v1/datasets/{dataset_id}/examples"]["get"]
    assert any(p["name"] == "indices" and p["required"] for p in examples["parameters"])
    assert "application/problem+json" in examples["responses"]["404"]["content"]
    assert "application/problem+json" in examples["responses"]["422"]["content"]
    assert "/v1/audits/{audit_id}/scores/histogram" in paths
    assert not any(path.startswith("/ui") for path in paths)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "/v1/datasets/{id}/examples" in readme and "/v1/audits/{id}/scores/histogram" in readme


# ------------------------------------------------------------------------------------------ the page

def test_page_and_assets_carry_the_csp(app):
    client = app["anonymous"]  # the page itself needs no key: it asks for one
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for response in (page, client.get("/ui/app.js"), client.get("/ui/app.css"), client.get("/ui/favicon.svg")):
        assert response.status_code == 200, response.url
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/../app/main.py").status_code == 404
    assert client.get("/ui/index.html.bak").status_code == 404


def test_assets_load_nothing_from_elsewhere_and_build_no_html():
    files = sorted(UI_DIR.iterdir())
    assert {f.name for f in files} == {"index.html", "app.js", "app.css", "favicon.svg"}
    for path in files:
        text = path.read_text()
        # the one URL allowed is the SVG namespace name (an identifier, never fetched)
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{path.name} names another origin: {urls}"
        assert "@import" not in text and "url(" not in text.replace("URL.createObjectURL(", ""), path.name
    html = (UI_DIR / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/app.js" defer>']
    assert "<style" not in html and " style=" not in html and not re.search(r"\son\w+=", html)
    script = (UI_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "localStorage"):
        assert sink not in script, sink
    # the key: kept in sessionStorage, sent as the Authorization header, never put in a URL
    assert 'headers.Authorization = "Bearer " + key' in script and "sessionStorage" in script
    assert not re.search(r"[?&](api_?key|key|token)=", script)


def test_wheel_ships_the_page():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "static/*" in project["tool"]["setuptools"]["package-data"]["app.ui"]
