"""Load check on loopback: status polls at a fixed rate (open loop: a request is sent on schedule whether
or not the earlier ones have been answered, and its latency counts from its scheduled time, so a
stalled server cannot hide its queue) plus a trickle of uploads, against `pbrf-audit serve` while an
audit runs on its worker. Bounded in time; talks only to 127.0.0.1.

    .venv/bin/python bench/load.py [--backend postgres_redis|embedded] [--seconds 20] [--rate 200]
        [--worker-threads N]   (unset: serve's default, one core left to the API)
Writes bench/results/load-<backend>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from common import ROOT, environment, table, write_result

sys.path.insert(0, str(ROOT))
from tests.conftest import Service, _service_env, fresh_postgres_database  # noqa: E402
from tests.helpers import export_onnx, npz_bytes, quick_mlp, synthetic_classification  # noqa: E402



def cpu_seconds_by_role(service_session: int) -> dict[str, float]:
    # service_session: the pid of `serve`, which tests.conftest.Service starts in a session of its own
    """CPU seconds (user + system) used so far by each role on this machine: the API (uvicorn), the
    worker (Celery and its audit process), PostgreSQL, Redis, this client, everything else. Service
    processes are told apart by their session id (serve runs in a session of its own)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid, session = int(stat.parent.name), int(fields[3])
        if pid == os.getpid():
            role = "client"
        elif session == service_session:
            role = "API" if "uvicorn" in command else "worker" if "celery" in command else "serve"
        elif command.startswith("postgres"):
            role = "PostgreSQL"
        elif "redis-server" in command:
            role = "Redis"
        else:
            role = "other"
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


class KeepAliveGets:
    """GET requests over a pool of HTTP/1.1 keep-alive connections, with no more work per request than
    writing it and reading the status line, the headers and Content-Length bytes. httpx spends more CPU
    per request than the API does (measured: the client kept 0.8 of the 2 cores busy at 200 requests/s,
    the API 0.3), so with it the load generator, sharing the machine, was what this bench measured."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.idle = host, port, []

    async def get(self, path: str) -> int:
        while self.idle:
            try:
                return await self._get(self.idle.pop(), path)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                # a connection the server closed while it sat idle (uvicorn's keep-alive timeout): like any
                # HTTP client, send again on another one, but only if no byte of a response came back
                # (an IncompleteReadError with `expected` set came from the body: the head had arrived)
                if isinstance(exc, asyncio.IncompleteReadError) and (exc.partial or exc.expected is not None):
                    raise
        return await self._get(await asyncio.open_connection(self.host, self.port), path)

    async def _get(self, connection, path: str) -> int:
        reader, writer = connection
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            fields = {k.strip(): v.strip() for k, v in (line.split(b":", 1) for line in
                                                        head.lower().split(b"\r\n")[1:] if b":" in line)}
            if b"content-length" not in fields:  # chunked or close-delimited: not what this client reads
                raise ValueError(f"response without Content-Length: {head[:80]!r}")
            await asyncio.wait_for(reader.readexactly(int(fields[b"content-length"])), 30)
        except BaseException:
            writer.close()
            raise
        if fields.get(b"connection") == b"close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(head[9:12])

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def timed(scheduled: float, send, latencies: list, errors: list, expected: int) -> None:
    try:
        r = await send()
        status = r if isinstance(r, int) else r.status_code
        if status != expected:
            errors.append(status)
    except (httpx.HTTPError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            asyncio.TimeoutError) as exc:
        errors.append(type(exc).__name__)
    latencies.append(time.perf_counter() - scheduled)


async def open_loop(rate: float, seconds: float, send, expected: int):
    """Send `rate` requests per second for `seconds`, each on schedule; returns (latencies, errors, lag):
    lag is how late the client itself started its requests (its own CPU share on a busy machine)."""
    latencies, errors, tasks, lags = [], [], [], []
    started = time.perf_counter()
    for i in range(int(rate * seconds)):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, time.perf_counter() - scheduled))
        tasks.append(asyncio.create_task(timed(scheduled, send, latencies, errors, expected)))
    await asyncio.gather(*tasks)
    return latencies, errors, lags


async def run(service, audit_id, seconds, rate, upload_rate, content):
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    gets = KeepAliveGets("127.0.0.1", service.port)
    async with httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as client:
        polls = open_loop(rate, seconds, lambda: gets.get(f"/v1/audits/{audit_id}"), 200)
        uploads = open_loop(upload_rate, seconds,
                            lambda: client.post("/v1/datasets", files={"file": ("d.npz", content)}), 201)
        try:
            return await asyncio.gather(polls, uploads)
        finally:
            gets.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["embedded", "postgres_redis"], default="postgres_redis")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=200, help="status polls per second")
    parser.add_argument("--uploads", type=float, default=2, help="dataset uploads per second")
    parser.add_argument("--worker-threads", type=int, default=None)
    parser.add_argument("--idle-worker", action="store_true", help="cancel the audit first: polls with no audit running")
    args = parser.parse_args()
    with fresh_postgres_database("pbrf_load") if args.backend == "postgres_redis" else contextlib.nullcontext() as pg:
        tmp = Path(tempfile.mkdtemp(prefix="pbrf-load-"))
        env = _service_env(args.backend, pg)
        if args.worker_threads:
            env["PBRF_WORKER_THREADS"] = str(args.worker_threads)
        service = Service(env, tmp)
        service.start()
        try:
            inputs, labels = synthetic_classification(n=200_000, features=64, classes=10, seed=1)
            model = export_onnx(quick_mlp(inputs[:5000], labels[:5000], hidden=512, epochs=20),
                                torch.from_numpy(inputs[:2]), tmp / "m.onnx")
            with service.client() as client:
                with open(model, "rb") as f:
                    m = client.post("/v1/models", files={"file": ("m.onnx", f)}).json()
                d = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(inputs=inputs, labels=labels))}).json()
                # lanczos: 65 passes over the data, so that it runs through the whole measurement
                audit = client.post("/v1/audits", json={"model_id": m["id"], "dataset_id": d["id"],
                                                        "method": "lanczos"}).json()
                while client.get(f"/v1/audits/{audit['id']}").json()["status"] == "queued":
                    time.sleep(0.1)
                time.sleep(2)  # into the audit's computing
                if args.idle_worker:  # the baseline: the same polls with the worker idle
                    client.post(f"/v1/audits/{audit['id']}/cancel")
                    while client.get(f"/v1/audits/{audit['id']}").json()["status"] != "cancelled":
                        time.sleep(0.1)
            small = npz_bytes(inputs=inputs[:200], labels=labels[:200])
            # the client's heap (torch, the test helpers) is large: a full collection in the middle of the
            # open loop stalls its sending for tens of ms. What exists now is never garbage: freeze it.
            gc.collect()
            gc.freeze()
            cpu_before, wall_before = cpu_seconds_by_role(service.process.pid), time.perf_counter()
            (polls, poll_errors, lags), (uploads, upload_errors, _) = asyncio.run(
                run(service, audit["id"], args.seconds, args.rate, args.uploads, small))
            cpu_after, wall = cpu_seconds_by_role(service.process.pid), time.perf_counter() - wall_before
            with service.client() as client:
                state = client.get(f"/v1/audits/{audit['id']}").json()
                client.post(f"/v1/audits/{audit['id']}/cancel")  # the worker's warm shutdown would wait for it
        finally:
            service.stop()
    for name, errs in (("polls", poll_errors), ("uploads", upload_errors)):
        if errs:
            print(f"{name}: errors {collections.Counter(errs).most_common()}")
    rows = []
    for name, lat, errs, rate in (("GET /v1/audits/{id}", polls, poll_errors, args.rate),
                                  ("POST /v1/datasets (200 rows)", uploads, upload_errors, args.uploads)):
        if not lat:
            continue
        lat_ms = np.array(lat) * 1000
        rows.append({"request": name, "sent per second": rate, "served": len(lat), "errors": len(errs),
                     "p50 ms": float(np.percentile(lat_ms, 50)), "p99 ms": float(np.percentile(lat_ms, 99)),
                     "max ms": float(lat_ms.max())})
    # cores each role kept busy on average while the requests ran (2.0 = the whole machine)
    cores = {role: (cpu_after.get(role, 0.0) - cpu_before.get(role, 0.0)) / wall for role in cpu_after}
    usage = ", ".join(f"{role} {value:.2f}" for role, value in sorted(cores.items(), key=lambda kv: -kv[1])
                      if value >= 0.005)
    threads = args.worker_threads or "serve's default (one core left to the API)"
    text = (f"# Load check on loopback ({args.backend})\n\nOpen loop for {args.seconds:.0f} s: {args.rate:.0f} status polls "
            f"and {args.uploads:g} uploads per second, each sent on schedule and timed from its scheduled "
            f"moment, against `pbrf-audit serve` (one uvicorn process, one worker; worker torch threads: {threads}) "
            f"while a `lanczos` audit of 200,000 examples ran on the worker (its state at the end: {state['status']}, "
            f"stage {state['stage']!r}). The client runs on the same machine; its own lag in sending: p99 "
            f"{np.percentile(np.array(lags) * 1000, 99):.1f} ms. Cores busy on average while the requests "
            f"ran, by role: {usage} (of {os.cpu_count()}).\n"
            f"Environment: {environment()}, {os.cpu_count()} cores\n\n"
            + table(rows, ["request", "sent per second", "served", "errors", "p50 ms", "p99 ms", "max ms"]) + "\n")
    if args.idle_worker:
        text = text.replace("while a `lanczos` audit of 200,000 examples ran on the worker", "with the worker idle "
                            "(the `lanczos` audit polled was cancelled first)")
    print(text)
    print(f"written to {write_result(f'load-{args.backend}.md', text)}")


if __name__ == "__main__":
    main()
