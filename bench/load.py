"""Load check on loopback: many concurrent status polls and uploads against a running service while an
audit runs on its worker. Bounded in time and request count; talks only to 127.0.0.1.

    .venv/bin/python bench/load.py [--backend postgres_redis|embedded] [--seconds 20] [--concurrency 16]
Writes bench/results/load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from common import ROOT, environment, table, write_result

sys.path.insert(0, str(ROOT))
from tests.conftest import Service, _service_env  # noqa: E402
from tests.helpers import export_onnx, npz_bytes, quick_mlp, synthetic_classification  # noqa: E402

MAX_REQUESTS = 50_000


async def poller(client, url, stop_at, latencies, errors, counter):
    while time.monotonic() < stop_at and counter[0] < MAX_REQUESTS:
        counter[0] += 1
        started = time.perf_counter()
        try:
            r = await client.get(url)
            if r.status_code != 200:
                errors.append(r.status_code)
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
        latencies.append(time.perf_counter() - started)


async def uploader(client, content, stop_at, latencies, errors, counter):
    while time.monotonic() < stop_at and counter[0] < MAX_REQUESTS:
        counter[0] += 1
        started = time.perf_counter()
        try:
            r = await client.post("/v1/datasets", files={"file": ("d.npz", content)})
            if r.status_code != 201:
                errors.append(r.status_code)
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)


async def run(service, audit_id, seconds, concurrency, content):
    polls, uploads, poll_errors, upload_errors = [], [], [], []
    counter = [0]
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as client:
        tasks = [poller(client, f"/v1/audits/{audit_id}", stop_at, polls, poll_errors, counter)
                 for _ in range(concurrency)]
        tasks += [uploader(client, content, stop_at, uploads, upload_errors, counter) for _ in range(2)]
        await asyncio.gather(*tasks)
    return polls, uploads, poll_errors, upload_errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["embedded", "postgres_redis"], default="postgres_redis")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    pg = None
    if args.backend == "postgres_redis":
        import uuid

        import psycopg

        from tests.conftest import POSTGRES_ADMIN
        name = f"pbrf_load_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        pg = f"postgresql+psycopg://{POSTGRES_ADMIN.rsplit('/', 1)[0].split('://', 1)[1]}/{name}"
    tmp = Path(tempfile.mkdtemp(prefix="pbrf-load-"))
    service = Service(_service_env(args.backend, pg), tmp)
    service.start()
    try:
        inputs, labels = synthetic_classification(n=4000, features=4, classes=3, seed=1)
        model = export_onnx(quick_mlp(inputs, labels, hidden=5), torch.from_numpy(inputs[:2]), tmp / "m.onnx")
        with service.client() as client:
            with open(model, "rb") as f:
                m = client.post("/v1/models", files={"file": ("m.onnx", f)}).json()
            d = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(inputs=inputs, labels=labels))}).json()
            audit = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"], "method": "exact",
                                                    "batch_size": 2}).json()
        small = npz_bytes(inputs=inputs[:200], labels=labels[:200])
        polls, uploads, poll_errors, upload_errors = asyncio.run(
            run(service, audit["id"], args.seconds, args.concurrency, small))
        with service.client() as client:
            state = client.get(f"/v1/audits/{audit['id']}").json()
    finally:
        service.stop()
    rows = []
    for name, lat, errs in (("GET /v1/audits/{id}", polls, poll_errors), ("POST /v1/datasets (200 rows)", uploads, upload_errors)):
        lat_ms = np.array(lat) * 1000
        rows.append({"request": name, "served": len(lat), "errors": len(errs),
                     "per second": len(lat) / args.seconds, "p50 ms": float(np.percentile(lat_ms, 50)),
                     "p99 ms": float(np.percentile(lat_ms, 99)), "max ms": float(lat_ms.max())})
    text = (f"# Load check on loopback ({args.backend})\n\n{args.concurrency} concurrent pollers + 2 uploaders for "
            f"{args.seconds:.0f} s against `pbrf-audit serve` (one uvicorn process, one worker) while an `exact` audit "
            f"ran on the worker (its state at the end: {state['status']}, progress {state['progress']:.2f}).\n"
            f"Environment: {environment()}\n\n"
            + table(rows, ["request", "served", "errors", "per second", "p50 ms", "p99 ms", "max ms"]) + "\n")
    print(text)
    print(f"written to {write_result(f'load-{args.backend}.md', text)}")


if __name__ == "__main__":
    main()
