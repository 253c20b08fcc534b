"""End to end on real data: scikit-learn's digits with 10% of the training labels flipped (seeded).

Train a small MLP here, export it to ONNX the way a user would, upload both to the running service,
run an `exact` audit on the worker and check the flipped examples rank high."""

from __future__ import annotations

import numpy as np
import torch

from tests.digits import noisy_digits, train_mlp
from tests.helpers import all_pages, export_onnx, npz_bytes, upload_dataset, upload_model, wait_for_audit


def test_flipped_digits_rank_high(embedded_service, tmp_path):
    x, y_noisy, _y_true, flipped, _, _ = noisy_digits(seed=0, noise=0.1, train_size=1500)
    model = train_mlp(x, y_noisy, hidden=32, epochs=300, seed=0)
    path = export_onnx(model, torch.from_numpy(x[:4]), tmp_path / "digits-mlp.onnx")
    with embedded_service.client() as client:
        m = upload_model(client, path, name="digits-mlp").json()
        assert m["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
        d = upload_dataset(client, npz_bytes(inputs=x, labels=y_noisy), "digits.npz").json()
        r = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "exact"})
        final, _ = wait_for_audit(client, r.json()["id"], timeout=300)
        assert final["status"] == "succeeded", final
        flags = all_pages(client, f"/v1/audits/{final['id']}/flags", limit=100)
    assert len(flags) == 150  # top 10% of 1500
    flagged_idx = np.array([f["index"] for f in flags])
    recall_top10 = flipped[flagged_idx].sum() / flipped.sum()
    # random ranking would find 10% of the flipped examples in the top 10%
    print(f"exact self-influence: {recall_top10:.1%} of flipped digits in the top 10% (random: 10%)")
    assert recall_top10 >= 0.6
