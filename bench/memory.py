"""Peak memory of an audit as N grows: 10^5 and 10^6 synthetic rows, an MLP (64-256-10, tanh),
`ekfac`, batch 500. Each measurement runs in a fresh process; the process's peak RSS is reset (Linux
/proc/self/clear_refs) once the data and the model are in memory, so "audit's own" is what the audit
adds on top of holding its training set, which every worker holds.

Two ways, as the service runs them:
- one worker: `run_audit` over all N rows (an audit below shard_size);
- sharded: the engine calls a sharded audit makes (app/influence/shards.py), shard_size 50,000 (the
  server default): every shard's partial sums for a stage are written to a file and read back one at a
  time by the reduce, as the coordinator does; the scores of every shard are joined at the end.

    .venv/bin/python bench/memory.py [--sizes 100000 1000000]
Writes bench/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, environment, table, write_result

FEATURES, HIDDEN, CLASSES, SHARD_SIZE = 64, 256, 10, 50_000


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(n: int, mode: str) -> dict:
    """In this (fresh) process: make the data and the model, reset the peak, audit, read the peak."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from app.influence import AuditConfig, FittedCurvature, run_audit
    from app.influence import shards as sharding
    from app.influence.audit import set_up_audit
    from tests.helpers import quick_mlp

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLASSES, FEATURES)).astype(np.float32) * 2
    labels = rng.integers(0, CLASSES, size=n)
    inputs = centers[labels]
    inputs += rng.normal(size=(n, FEATURES)).astype(np.float32)
    model = quick_mlp(inputs[:5000], labels[:5000], hidden=HIDDEN, epochs=30)
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels.astype(np.int64))
    config = AuditConfig(method="ekfac", seed=0, batch_size=500)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    if mode == "one worker":
        result = run_audit(model, x, y, config)
        scores = result.scores
    else:
        plan = sharding.ShardPlan.make(set_up_audit(model, x, y, config), n, SHARD_SIZE)
        state, parts = None, []
        with tempfile.TemporaryDirectory() as tmp:
            for step in plan.stages:
                files = []
                for index in range(plan.num_shards):
                    setup = set_up_audit(model, x, y, config)
                    if step == sharding.SCORES:
                        parts.append(sharding.score_shard(setup, plan, index, x, y, state, config.loss))
                        continue
                    partial = sharding.fit_shard(setup, plan, step, index, x, y, state)
                    files.append(Path(tmp) / f"{step}-{index}")
                    files[-1].write_bytes(FittedCurvature(partial, {}).to_bytes())
                    del partial
                if step != sharding.SCORES:
                    partials = (FittedCurvature.from_bytes(f.read_bytes()).tensors for f in files)
                    state = sharding.finish_stage(set_up_audit(model, x, y, config), plan, step, partials, x, state)
        result = sharding.conclude_sharded(config, set_up_audit(model, x, y, config), plan, x, y, parts, state, {},
                                           started, False)
        scores = result.scores
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    return {"N": n, "mode": mode, "data MB": round((x.nbytes + y.nbytes) / 2**20, 1),
            "RSS before audit MB": round(before / 1024, 1), "peak RSS MB": round(peak / 1024, 1),
            "audit's own MB": round((peak - before) / 1024, 1),
            "audit's own bytes per row": round((peak - before) * 1024 / n, 1),
            "seconds": round(seconds, 1), "finite scores": bool(torch.isfinite(scores).all())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # N and mode, in the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(int(args.measure[0]), args.measure[1])))
        return
    rows = []
    for n in args.sizes:
        for mode in ("one worker", "sharded"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(n), mode], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    text = (f"# Memory as N grows\n\nEK-FAC audit of an MLP ({FEATURES}-{HIDDEN}-{CLASSES}, tanh) on synthetic rows, "
            f"batch 500; sharded: shard_size {SHARD_SIZE:,}. Each row is a fresh process; its peak RSS is reset "
            "once the training set and the model are loaded, so \"audit's own\" is what the audit adds to "
            f"holding its data.\nEnvironment: {environment()}\n\n"
            + table(rows, list(rows[0])) + "\n")
    print(text)
    print(f"written to {write_result('memory.md', text)}")


if __name__ == "__main__":
    main()
