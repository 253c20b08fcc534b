"""Make an example upload: scikit-learn's digits with 10% of labels flipped, a small MLP trained on
them and exported to ONNX. Writes digits-mlp.onnx, digits-noisy.npz and digits-flipped.npy into
examples/out/ (git-ignored), or into the folder given as its argument.

    .venv/bin/python examples/digits_example.py [FOLDER]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.digits import noisy_digits, train_mlp  # noqa: E402

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "out"
out.mkdir(parents=True, exist_ok=True)
x, y_noisy, y_true, flipped, _, _ = noisy_digits(seed=0, noise=0.1)
model = train_mlp(x, y_noisy, hidden=32, epochs=300)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # A dynamic batch axis and weights inside the file (the service refuses external data).
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), out / "digits-mlp.onnx", dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
np.savez(out / "digits-noisy.npz", inputs=x, labels=y_noisy)
np.save(out / "digits-flipped.npy", np.flatnonzero(flipped))
print(f"wrote digits-mlp.onnx and digits-noisy.npz into {out} ({flipped.sum()} of {len(x)} labels flipped; "
      "their indices are in digits-flipped.npy)")
