"""Speed and memory: a full `ekfac` audit against one training epoch on the same model and data, and
against kronfluence's EK-FAC self-influence, each measured in its own subprocess (peak RSS).

    .venv/bin/python bench/speed.py [--n 20000] [--kronfluence-n 20000]
Writes bench/results/speed.md. Ratios are what to read: timings on 2-core machines are noisy.

    .venv/bin/python bench/speed.py --rows cnn:ours-ekfac,rescnn:ours-ekfac [--repeat 3]
measures only those rows and each model's training epoch (the fastest of --repeat runs of each, every
run its own subprocess), prints them and writes nothing. Models: mlp, cnn (the table's), rescnn (a
residual CNN with BatchNorm on 3x32x32, tests/zoo.py) and transformer (tests/zoo.py's encoder on token
ids and a padding mask, packed side by side).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from common import ROOT, environment, table, write_result


def make_data(kind: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "transformer":
        from tests.zoo import token_classification

        ids, mask, labels = token_classification(n, seed=seed)
        return torch.cat([torch.from_numpy(ids), torch.from_numpy(mask)], 1), torch.from_numpy(labels)
    if kind == "rescnn":
        x = torch.randn(n, 3, 32, 32, generator=g)
        teacher = torch.randn(3 * 32 * 32, 10, generator=g)
    elif kind == "mlp":
        x = torch.randn(n, 256, generator=g)
        teacher = torch.randn(256, 10, generator=g)
    else:
        x = torch.randn(n, 3, 16, 16, generator=g)
        teacher = torch.randn(3 * 16 * 16, 10, generator=g)
    logits = x.reshape(n, -1) @ teacher / 8
    y = torch.distributions.Categorical(logits=logits).sample(generator=g) if False else torch.multinomial(
        torch.softmax(logits, -1), 1, generator=g).squeeze(1)
    return x, y


class PackedInputs(nn.Module):
    """Token ids and attention mask laid side by side in one int64 tensor, as the service packs them."""

    def __init__(self, model: nn.Module, length: int = 16):
        super().__init__()
        self.model, self.length = model, length

    def forward(self, packed):
        return self.model(packed[..., : self.length], packed[..., self.length :])


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "rescnn":
        from tests.zoo import ResidualCNN

        return ResidualCNN(classes=10, width=16)
    if kind == "transformer":
        from tests.zoo import TinyTransformer

        return PackedInputs(TinyTransformer(layers=2))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


def epoch(model, x, y, batch_size=128):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for idx in torch.randperm(len(x)).split(batch_size):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()


def child(task: str, kind: str, n: int) -> dict:
    """Runs in a subprocess: one measurement, printed as JSON."""
    x, y = make_data(kind, n)
    model = make_model(kind)
    epoch(model, x, y)  # a trained-ish model; also warms up kernels
    start = time.perf_counter()
    if task == "epoch":
        epoch(model, x, y)
    elif task.startswith("ours"):
        from app.influence import AuditConfig, run_audit

        method, _, fisher = task.removeprefix("ours-").partition(":")
        stream = method.endswith("-stream")
        method = method.removesuffix("-stream")
        run_audit(model, x, y, AuditConfig(method=method, fisher_samples=int(fisher or 1),
                                           **({"cache_bytes": 0} if stream else {})))
    elif task == "kronfluence":
        from common import kronfluence_self_influence

        kronfluence_self_influence(model, x.numpy(), y.numpy(), strategy="ekfac", batch_size=512)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(task: str, kind: str, n: int, timeout: int = 3600) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", task, kind, str(n)], capture_output=True, text=True,
                         cwd=ROOT, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--kronfluence-n", type=int, default=20_000)
    parser.add_argument("--cnn-n", type=int, default=10_000)
    parser.add_argument("--rescnn-n", type=int, default=2_000)
    parser.add_argument("--transformer-n", type=int, default=10_000)
    parser.add_argument("--rows", help="comma-separated kind:task rows to measure alone (see the docstring)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        task, kind, n = args.child
        print(json.dumps(child(task, kind, int(n))))
        return
    if args.rows:
        sizes = {"mlp": args.n, "cnn": args.cnn_n, "rescnn": args.rescnn_n, "transformer": args.transformer_n}
        wanted = [row.split(":", 1) for row in args.rows.split(",")]
        rows = []
        for kind in dict.fromkeys(kind for kind, _ in wanted):
            n = sizes[kind]
            runs = {"epoch": []} | {task: [] for k, task in wanted if k == kind and task != "epoch"}
            for _ in range(args.repeat):  # interleaved, so that a noisy spell hits every row alike
                for task in runs:
                    runs[task].append(measure(task, kind, n))
            best = {task: min(ms, key=lambda m: m["seconds"]) for task, ms in runs.items()}
            params = sum(p.numel() for p in make_model(kind).parameters())
            for task, m in best.items():
                rows.append({"model": f"{kind} ({params / 1000:.0f}k params)", "N": n, "method": task,
                             "seconds": m["seconds"], "epochs' worth": m["seconds"] / best["epoch"]["seconds"],
                             "peak RSS MB": m["peak_rss_mb"]})
                print(rows[-1], flush=True)
        print(f"\nEnvironment: {environment()}; fastest of {args.repeat} run(s) each\n")
        print(table(rows, ["model", "N", "method", "seconds", "epochs' worth", "peak RSS MB"]))
        return

    params = {k: sum(p.numel() for p in make_model(k).parameters()) for k in ("mlp", "cnn")}
    rows = []
    for kind, n in (("mlp", args.n), ("cnn", args.cnn_n)):
        epoch_m = measure("epoch", kind, n)
        print(kind, "epoch", epoch_m, flush=True)
        for task in ("ours-ekfac", "ours-ekfac-stream", "ours-ekfac:0", "ours-kfac", "ours-diagonal", "ours-identity"):
            m = measure(task, kind, n)
            rows.append({"model": f"{kind} ({params[kind] / 1000:.0f}k params)", "N": n, "method": task,
                         "seconds": m["seconds"], "epochs' worth": m["seconds"] / epoch_m["seconds"],
                         "peak RSS MB": m["peak_rss_mb"]})
            print(rows[-1], flush=True)
        rows.append({"model": f"{kind} ({params[kind] / 1000:.0f}k params)", "N": n, "method": "one training epoch (Adam, batch 128)",
                     "seconds": epoch_m["seconds"], "epochs' worth": 1.0, "peak RSS MB": epoch_m["peak_rss_mb"]})
        kn = args.kronfluence_n if kind == "mlp" else args.cnn_n
        if kn:
            ours_same = measure("ours-ekfac", kind, kn) if kn != n else {"seconds": rows[-7]["seconds"]}
            epoch_k = measure("epoch", kind, kn) if kn != n else epoch_m
            k = measure("kronfluence", kind, kn)
            rows.append({"model": f"{kind} ({params[kind] / 1000:.0f}k params)", "N": kn, "method": "kronfluence 1.0.1 ekfac (peer)",
                         "seconds": k["seconds"], "epochs' worth": k["seconds"] / epoch_k["seconds"],
                         "peak RSS MB": k["peak_rss_mb"],
                         "ours / kronfluence": ours_same["seconds"] / k["seconds"]})
            print(rows[-1], flush=True)

    # memory must not scale with N x P: the same audit at N/10 and N, streaming and one-pass
    data_mb = args.n * 256 * 4 / 2**20
    memory = f"\nAn N x P gradient matrix would be {args.n * params['mlp'] * 4 / 2**30:.1f} GiB at N={args.n}; " \
             f"the float32 inputs themselves grow by {data_mb * 0.9:.0f} MB from N={args.n // 10} to N={args.n}.\n\n"
    for task, label in (("ours-ekfac-stream", "streaming (cache_bytes=0)"), ("ours-ekfac", "one pass (default budget)")):
        small = measure(task, "mlp", args.n // 10)
        large = measure(task, "mlp", args.n)
        memory += (f"- `ekfac` {label}: peak RSS {small['peak_rss_mb']:.0f} MB at N={args.n // 10}, "
                   f"{large['peak_rss_mb']:.0f} MB at N={args.n}\n")
    text = (f"# Speed and memory\n\nEnvironment: {environment()}\n\n"
            "`ours-ekfac` runs in one pass (per-example layer state kept, within a 512 MiB budget); "
            "`ours-ekfac-stream` streams one pass per stage with flat memory; `ours-ekfac:0` uses the exact Fisher "
            "expectation over classes instead of one sampled label (streams). Batch sizes: the engine's automatic choice.\n"
            "Every row is its own subprocess (the model gets one warm-up epoch first, not timed).\n\n"
            + table(rows, ["model", "N", "method", "seconds", "epochs' worth", "ours / kronfluence", "peak RSS MB"])
            + "\n" + memory)
    print(text)
    print(f"written to {write_result('speed.md', text)}")


if __name__ == "__main__":
    main()
