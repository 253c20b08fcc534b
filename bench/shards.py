"""Sharded audits: the same EK-FAC audit through the real service with one worker process and with
two (PBRF_WORKER_CONCURRENCY), one torch thread per process, so that two processes have twice the
cores of one; plus the same audit in one shard (one thread, and all the machine's threads) for
reference. Reports wall-clock seconds (the audit's started_at to finished_at), the speed-up of two
workers over one, shards per worker process, and that the scores agree.

    .venv/bin/python bench/shards.py [--backend postgres_redis|embedded] [--examples 200000] [--shard-size 20000]
Writes bench/results/shards-<backend>.md. With --folds: method folds, a task per fold, on one worker and on
two; writes bench/results/shards-folds-<backend>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from common import ROOT, environment, table, write_result

sys.path.insert(0, str(ROOT))
from tests.conftest import Service, _service_env, fresh_postgres_database  # noqa: E402
from tests.helpers import (all_pages, export_onnx, npz_bytes, quick_mlp, synthetic_classification,  # noqa: E402
                           wait_for_audit)


def _seconds(audit: dict) -> float:
    return (datetime.fromisoformat(audit["finished_at"]) - datetime.fromisoformat(audit["started_at"])).total_seconds()


def run_audit(backend: str, workers: int, threads: int, model_path: Path, data: bytes, body: dict, tmp: Path):
    """Start the service with `workers` worker processes, audit, stop; returns (audit, scores)."""
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(fresh_postgres_database("pbrf_bench")) if backend == "postgres_redis" else None
        # torch's threads per worker process (serve would otherwise leave one core to the API)
        env = _service_env(backend, pg) | {"PBRF_WORKER_CONCURRENCY": str(workers),
                                           "PBRF_HEARTBEAT_SECONDS": "2", "OMP_NUM_THREADS": str(threads),
                                           "PBRF_WORKER_THREADS": str(threads)}
        service = Service(env, tmp / f"svc-{backend}-{workers}-{threads}-{body.get('shard_size', body['method'])}")
        service.start()
        stack.callback(service.stop)
        with service.client() as client:
            with open(model_path, "rb") as f:
                m = client.post("/v1/models", files={"file": ("m.onnx", f)}).json()
            d = client.post("/v1/datasets", files={"file": ("d.npz", data)}).json()
            audit = client.post("/v1/audits", json=body | {"model_id": m["id"], "dataset_id": d["id"]}).json()
            # polled once a second: a tighter poll loop would take CPU from the workers being measured
            final, _ = wait_for_audit(client, audit["id"], timeout=3600, interval=1.0)
            if final["status"] != "succeeded":
                raise RuntimeError(f"audit {final['status']}: {final['error']}")
            scores = np.array([r["score"] for r in all_pages(client, f"/v1/audits/{audit['id']}/scores", limit=10_000)])
        return final, scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["embedded", "postgres_redis"], default="postgres_redis")
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=20_000)
    parser.add_argument("--folds", action="store_true", help=(
        "measure method folds instead (a task per fold; default data: 20,000 examples, hidden 256)"))
    args = parser.parse_args()
    if args.folds:
        return folds_main(args)
    tmp = Path(tempfile.mkdtemp(prefix="pbrf-shards-"))
    inputs, labels = synthetic_classification(n=args.examples, features=args.features, classes=10, seed=3)
    model = quick_mlp(inputs, labels, hidden=args.hidden, epochs=20)
    model_path = export_onnx(model, torch.from_numpy(inputs[:2]), tmp / "m.onnx")
    data = npz_bytes(inputs=inputs, labels=labels)
    body = {"method": "ekfac", "seed": 1, "batch_size": 500}
    cores = torch.get_num_threads()
    runs = [("one worker, one shard", 1, 1, body | {"shard_size": 10**9}),
            ("one worker, sharded", 1, 1, body | {"shard_size": args.shard_size}),
            ("two workers, sharded", 2, 1, body | {"shard_size": args.shard_size}),
            (f"one worker with {cores} threads, one shard", 1, cores, body | {"shard_size": 10**9})]
    rows, results = [], {}
    for name, workers, threads, request in runs:
        final, scores = run_audit(args.backend, workers, threads, model_path, data, request, tmp)
        shards = final["summary"].get("shards", {})
        results[name] = (final, scores)
        steps = final["summary"].get("seconds", {})
        rows.append({"run": name, "worker processes": workers, "threads each": threads,
                     "shards": shards.get("num_shards", 1), "seconds": _seconds(final),
                     "of which fit + scores": steps.get("total"),
                     "shards per worker": ", ".join(str(v) for v in shards.get("shards_per_process", {}).values()) or "-"})
        print(rows[-1], flush=True)
    one = results["one worker, one shard"][1]
    for row in rows:
        scores = results[row["run"]][1]
        row["max rel. score diff vs one shard"] = float(np.abs(scores - one).max() / np.abs(one).max())
    speedup = rows[1]["seconds"] / rows[2]["seconds"]
    text = (f"# Sharded audits over worker processes ({args.backend})\n\n"
            f"EK-FAC audit of an MLP ({args.features}-{args.hidden}-10, tanh) "
            f"on {args.examples:,} synthetic examples, batch 500, shard_size {args.shard_size:,}, through "
            f"`pbrf-audit serve` (uvicorn + Celery). Seconds: the audit's started_at to finished_at; of which fit + "
            f"scores: the engine's part (summary.seconds.total), the rest being loading and writing the results "
            f"(10% of the examples as flag rows).\n"
            f"Environment: {environment()}\n\n"
            + table(rows, ["run", "worker processes", "threads each", "shards", "seconds", "of which fit + scores",
                           "shards per worker",
                           "max rel. score diff vs one shard"])
            + f"\n\nSpeed-up of two workers over one (both sharded, one thread per process): **{speedup:.2f}x**; "
              f"sharding's own cost on one worker: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x the one-shard run; "
              f"two workers against one process using all {cores} threads: "
              f"{rows[3]['seconds'] / rows[2]['seconds']:.2f}x.\n")
    print(text)
    print(f"written to {write_result(f'shards-{args.backend}.md', text)}")


def folds_main(args) -> None:
    """Method folds on one worker process and on two (one thread each), and on one process with every
    thread: the folds are the tasks, so with K folds two workers can at best run ceil(K/2) rounds."""
    examples = args.examples if args.examples != 200_000 else 20_000
    hidden = args.hidden if args.hidden != 1024 else 256
    tmp = Path(tempfile.mkdtemp(prefix="pbrf-shards-"))
    inputs, labels = synthetic_classification(n=examples, features=args.features, classes=10, seed=3)
    labels[: examples // 10] = (labels[: examples // 10] + 1) % 10  # wrong labels for the folds to find
    model = quick_mlp(inputs, labels, hidden=hidden, epochs=20)
    model_path = export_onnx(model, torch.from_numpy(inputs[:2]), tmp / "m.onnx")
    data = npz_bytes(inputs=inputs, labels=labels)
    body = {"method": "folds", "seed": 1}
    cores = torch.get_num_threads()
    runs = [("one worker", 1, 1), ("two workers", 2, 1), (f"one worker with {cores} threads", 1, cores)]
    rows, results = [], {}
    for name, workers, threads in runs:
        final, scores = run_audit(args.backend, workers, threads, model_path, data, body | {"name": name}, tmp)
        shards = final["summary"]["shards"]
        folds = final["summary"]["out_of_sample"]["per_fold"]
        results[name] = scores
        rows.append({"run": name, "worker processes": workers, "threads each": threads,
                     "seconds": _seconds(final), "folds per process": ", ".join(
                         str(v) for v in shards["shards_per_process"].values()),
                     "epochs run per fold": ", ".join(str(f["epochs_run"]) for f in folds)})
        print(rows[-1], flush=True)
    for row in rows:
        row["max score diff vs one worker"] = float(np.abs(results[row["run"]] - results["one worker"]).max())
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    text = (f"# Method folds over worker processes ({args.backend})\n\n"
            f"`folds` audit (5 folds, default settings) of an MLP ({args.features}-{hidden}-10, tanh) on {examples:,} "
            f"synthetic examples (10% of labels moved), through `pbrf-audit serve`. Every fold is one task; the "
            f"audit's own process and any idle worker take them. Seconds: the audit's started_at to finished_at.\n"
            f"Environment: {environment()}\n\n"
            + table(rows, ["run", "worker processes", "threads each", "seconds", "folds per process",
                           "epochs run per fold", "max score diff vs one worker"])
            + f"\n\nSpeed-up of two workers over one (one thread per process): **{speedup:.2f}x** (at most "
              f"5/3 = 1.67x with 5 equal folds: the second round has one fold left for two workers); two workers "
              f"against one process using all {cores} threads: {rows[2]['seconds'] / rows[1]['seconds']:.2f}x. "
              "The last column compares each run's scores (1 - out-of-fold probability) with the one-worker run's: "
              "each fold is seeded by its index alone, so which process ran it does not matter.\n")
    print(text)
    print(f"written to {write_result(f'shards-folds-{args.backend}.md', text)}")


if __name__ == "__main__":
    main()
