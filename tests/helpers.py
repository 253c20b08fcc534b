"""Test helpers: models exported the way users export them, datasets as upload bytes, polling."""

from __future__ import annotations

import io
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from torch import nn


def export_onnx(model: nn.Module, example: torch.Tensor | tuple, path: Path, dynamo: bool = True,
                opset_version: int | None = None, external_data: bool = False,
                input_names: list[str] | None = None) -> Path:
    """torch.onnx.export with a dynamic batch axis on every input, as the README tells users to do.
    `example` is one batch, or a tuple of them for a model with several inputs. external_data=True is
    torch's default: the weights go to `path.name + '.data'` beside the model."""
    model = model.eval()
    examples = example if isinstance(example, tuple) else (example,)
    names = input_names or (["x"] if len(examples) == 1 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, examples, str(path), dynamo=True, external_data=external_data,
                              dynamic_shapes=tuple({0: batch} for _ in examples), verbose=False,
                              **({"input_names": names} if names else {}))
        else:
            names = names or [f"input_{i}" for i in range(len(examples))]
            torch.onnx.export(model, examples, str(path), dynamo=False, input_names=names,
                              dynamic_axes={name: {0: "batch"} for name in names},
                              **({"opset_version": opset_version} if opset_version else {}))
    return path


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def synthetic_classification(n: int = 240, features: int = 6, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)) * 2.0
    labels = rng.integers(0, classes, size=n)
    inputs = (centers[labels] + rng.normal(size=(n, features))).astype(np.float32)
    return inputs, labels.astype(np.int64)


def quick_mlp(inputs: np.ndarray, labels: np.ndarray, hidden: int = 8, outputs: int | None = None,
              epochs: int = 200, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs.shape[1], hidden), nn.Tanh(),
                          nn.Linear(hidden, outputs or int(labels.max()) + 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def overflowing_mlp(path: Path) -> Path:
    """safetensors of the built-in MLP 5-4-3 (architecture {"type": "mlp", "input_size": 5, "hidden_sizes":
    [4], "num_classes": 3}) with weights of 1e30 and zero biases: finite outputs on zero inputs (the
    upload's smoke test), inf and NaN on any real input. An audit of it can only fail when it runs."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p * 1e30 if p.dim() == 2 else torch.zeros_like(p))
    save_file(model.state_dict(), str(path))
    return path


def upload_model(client: httpx.Client, path: Path, **form) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post("/v1/models", files={"file": (path.name, f, "application/octet-stream")}, data=form)


def upload_dataset(client: httpx.Client, content: bytes, filename: str = "data.npz") -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (filename, content, "application/octet-stream")})


def wait_for_audit(client: httpx.Client, audit_id: str, timeout: float = 180, interval: float = 0.05):
    """Poll until the audit ends; returns (final body, list of (status, stage, progress) seen)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/audits/{audit_id}").json()
        seen.append((body["status"], body["stage"], body["progress"]))
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body, seen
        time.sleep(interval)
    raise AssertionError(f"audit {audit_id} did not finish in {timeout}s; last: {seen[-3:]}")


def assert_problem(response: httpx.Response, status: int, slug: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["detail"] and body["type"]
    if slug:
        assert body["type"].endswith("/" + slug), body
    return body


def all_pages(client: httpx.Client, path: str, limit: int = 100) -> list[dict]:
    """Follow next_cursor from the first page to the last; every item, in order."""
    items, cursor = [], None
    while True:
        response = client.get(path, params={"limit": limit} | ({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if not cursor:
            return items


def model_and_dataset_rows(session, tenant: str = "t"):
    """A model row (1,000 bytes) and a dataset row (2,000 bytes, 50 examples, 3 classes) of `tenant`,
    written straight to the database and flushed, for tests that need finished-job rows."""
    from app.artifacts.tables import DatasetArtifact, ModelArtifact

    model = ModelArtifact(tenant_id=tenant, name="m", format="onnx", sha256="a" * 64, size_bytes=1000,
                          num_parameters=10, input_shape=[4], num_outputs=3)
    dataset = DatasetArtifact(tenant_id=tenant, name="d", format="npz", sha256="b" * 64, size_bytes=2000,
                              num_examples=50, num_classes=3, input_shape=[4], label_counts=[20, 20, 10])
    session.add_all([model, dataset])
    session.flush()
    return model, dataset


@contextmanager
def in_process_app(data_dir, api_keys: str, prepare=None):
    """The app in process on a migrated SQLite database under `data_dir`, with static keys `api_keys`
    ("tenant:secret,..."); yields (app, what `prepare(session)` returned, if given). The environment is
    set only while the settings are read and cached: services this session starts later
    (tests/conftest.py) get it as it was. No lifespan: the validator server is not started."""
    import pytest

    from app.cli import migrate
    from app.core import config, db
    from app.main import create_app

    def clear():
        config.get_settings.cache_clear()
        db.get_engine.cache_clear()
        db.get_sessionmaker.cache_clear()

    mp = pytest.MonkeyPatch()
    mp.setenv("PBRF_DATA_DIR", str(data_dir))
    mp.setenv("PBRF_API_KEYS", api_keys)
    for name in ("PBRF_DATABASE_URL", "PBRF_BROKER_URL", "PBRF_STORAGE_DIR"):
        mp.delenv(name, raising=False)
    clear()
    try:
        config.get_settings()
        migrate()
        prepared = None
        if prepare is not None:
            with db.get_sessionmaker()() as session:
                prepared = prepare(session)
                session.commit()
        application = create_app()
    finally:
        mp.undo()
    try:
        yield application, prepared
    finally:
        db.get_engine().dispose()
        clear()
