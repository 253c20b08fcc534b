"""Device check for a session lent a GPU: the CUDA path of the engine agrees with the CPU path, and
how many examples per second a full audit scores. Prints a table and writes bench/results/gpu.md.

    python bench/gpu_check.py            # exits 2 when no CUDA device is visible
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from common import environment, table, write_result
from app.influence import AuditConfig, run_audit
from tests.digits import noisy_digits, train_mlp


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible")
        return 2
    x, y, _, _, _, _ = noisy_digits(seed=0)
    model = train_mlp(x, y, hidden=32, epochs=300)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    rows = []
    for method, extra in (("exact", {}), ("ekfac", {}), ("kfac", {}), ("diagonal", {}), ("identity", {}),
                          ("lanczos", {"lanczos_rank": 16}), ("loo", {"curvature": "ekfac"})):
        config = dict(method=method, damping=1e-3, seed=0, **extra)
        cpu = run_audit(model, X, Y, AuditConfig(device="cpu", **config)).scores.numpy()
        torch.cuda.synchronize()
        started = time.perf_counter()
        gpu = run_audit(model, X, Y, AuditConfig(device="cuda", **config)).scores.numpy()
        torch.cuda.synchronize()
        rows.append({"check": f"{method}: cuda vs cpu", "max rel diff": float(np.max(np.abs(gpu - cpu) / np.abs(cpu).clip(1e-12))),
                     "spearman": spearmanr(gpu, cpu).statistic, "seconds": time.perf_counter() - started})
        print(rows[-1], flush=True)
    # throughput: a larger synthetic problem
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 512
    inputs = torch.randn(n, d, generator=g)
    labels = torch.randint(0, 100, (n,), generator=g)
    big = torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 100))
    for method in ("ekfac", "identity", "loo"):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run_audit(big, inputs, labels, AuditConfig(method=method, device="cuda", cache_bytes=8 * 1024**3))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows.append({"check": f"{method} throughput, N={n}, P={sum(p.numel() for p in big.parameters())}, C=100",
                     "seconds": seconds, "examples/s": n / seconds})
        print(rows[-1], flush=True)
    text = (f"# CUDA check\n\nEnvironment: {environment()}\n\n"
            + table(rows, ["check", "max rel diff", "spearman", "seconds", "examples/s"]) + "\n")
    print(text)
    write_result("gpu.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
