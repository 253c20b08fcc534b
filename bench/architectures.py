"""Reach: architectures users export, beyond the test sweep's, through both of torch's exporters.

    .venv/bin/python bench/architectures.py [name ...]
Writes bench/results/architectures.md (all names) or prints (some). For each model (trained-like
weights: tests/zoo.distinct_weights) and exporter: the service's loader (conversion, the ONNX Runtime
reference check, the smoke test), the largest difference between the converted model's logits and the
PyTorch model's, the audited learned-value count against the exported graph's, and an `ekfac` audit of
16 examples (treatments by parameter count), or the error that stopped each step.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
import torchvision
from torch import nn

from common import environment, table, write_result
from app.artifacts.loaders import load_model
from app.influence import AuditConfig, run_audit
from tests.helpers import export_onnx
from tests.zoo import TorchEncoderClassifier, distinct_weights, exported_learned_parameters


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(50, 16), nn.LSTM(16, 24, batch_first=True), nn.Linear(24, 3)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class ConvText(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.conv, self.head = nn.Embedding(50, 16), nn.Conv1d(16, 32, 3, padding=1), nn.Linear(32, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.conv(self.embed(ids).transpose(1, 2))).amax(-1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attention = nn.Embedding(50, 16), nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, ids):
        h = self.embed(ids)
        a, _ = self.attention(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


def _ids(n):
    return torch.randint(0, 50, (n, 12), generator=torch.Generator().manual_seed(n))


MODELS = {
    "torch TransformerEncoder (GELU, 1 layer)": (TorchEncoderClassifier, _ids),
    "nn.MultiheadAttention + LayerNorm": (Attention, _ids),
    "LSTM on token ids": (LSTMClassifier, _ids),
    "GRU on vectors": (GRUClassifier, lambda n: torch.randn(n, 10, 8)),
    "Conv1d on token ids": (ConvText, _ids),
    "depthwise CNN + GroupNorm": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.GroupNorm(2, 8), nn.GELU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(8, 4)), lambda n: torch.randn(n, 3, 16, 16)),
    "MLP + BatchNorm1d + LayerNorm": (lambda: nn.Sequential(
        nn.Linear(10, 32), nn.BatchNorm1d(32), nn.LeakyReLU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Softplus(),
        nn.Linear(32, 4)), lambda n: torch.randn(n, 10)),
    "one-logit binary MLP": (lambda: nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1)),
                             lambda n: torch.randn(n, 10)),
    "torchvision ResNet-18 (3x32x32)": (lambda: torchvision.models.resnet18(num_classes=5),
                                        lambda n: torch.randn(n, 3, 32, 32)),
    "torchvision MobileNetV3-small (3x32x32)": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
                                                lambda n: torch.randn(n, 3, 32, 32)),
}


def probe(name: str, dynamo: bool) -> dict:
    build, batch = MODELS[name]
    row = {"model": name, "exporter": "dynamo (external data)" if dynamo else "TorchScript"}
    torch.manual_seed(0)
    model = distinct_weights(build()).eval()
    folder = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    try:
        path = export_onnx(model, batch(2), folder / "m.onnx", dynamo=dynamo, external_data=dynamo)
        loaded = load_model(path, "onnx", None, {p.name: p for p in folder.glob("*.data")})
    except Exception as exc:  # noqa: BLE001 - the row says what stopped it
        return row | {"loaded": f"no: {type(exc).__name__}: {str(exc)[:160]}"}
    proto = onnx.load(str(path), load_external_data=False)
    folded = not any(node.op_type == "BatchNormalization" for node in proto.graph.node)
    x = batch(16)
    with torch.no_grad():
        reference, converted = model(x), loaded.module(x)
    if converted.shape[1] == 2 * reference.shape[1] == 2:  # one logit, audited as [0, logit]
        converted = converted[:, 1:]
    row |= {"loaded": "yes", "max logit difference": f"{float((reference - converted).abs().max()):.1e}",
            "audited / exported learned values": f"{loaded.num_parameters} / {exported_learned_parameters(model, folded)}"}
    try:
        labels = torch.randint(0, max(2, reference.shape[1]), (16,), generator=torch.Generator().manual_seed(1))
        result = run_audit(loaded.module, x, labels, AuditConfig(method="ekfac"))
        treatments: dict[str, int] = {}
        for layer in result.summary["estimator"]["layers"]:
            treatments[layer["treatment"]] = treatments.get(layer["treatment"], 0) + layer["num_parameters"]
        finite = bool(torch.isfinite(result.scores).all())
        row["ekfac audit"] = ("finite scores; " if finite else "NON-FINITE scores; ") + ", ".join(
            f"{k}: {v}" for k, v in treatments.items())
    except Exception as exc:  # noqa: BLE001
        row["ekfac audit"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    names = sys.argv[1:] or list(MODELS)
    rows = [probe(name, dynamo) for name in names for dynamo in (True, False)]
    text = table(rows, ["model", "exporter", "loaded", "max logit difference", "audited / exported learned values",
                        "ekfac audit", "seconds"])
    if sys.argv[1:]:
        print(text)
        return
    path = write_result("architectures.md", f"# Architectures through both exporters\n\n{environment()}\n"
                        f"`.venv/bin/python bench/architectures.py`\n\n{text}\n")
    print(text, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
