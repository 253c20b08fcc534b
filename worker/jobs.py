"""What a worker does with one audit id: claim it, run the engine, persist the results atomically.

The audit row is the only source of truth. A claim is a compare-and-set from `queued` to `running`
that stamps a fresh claim token; every later write (progress, heartbeat, results) is conditional on
that token and on the status still being `running`, so a cancelled or re-claimed job can never be
overwritten by a stale attempt, and results are written exactly once.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx  # noqa: F401
import onnx2pytorch  # noqa: F401  imported once per worker, not in every job's child (torchvision: ~0.4 s)
import torch
from sqlalchemy import and_, case, delete, func, insert, or_, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.artifacts import loaders
from app.artifacts.service import dataset_limits, external_paths
from app.artifacts.tables import DatasetArtifact, ModelArtifact
from app.audits.tables import Attribution, Audit, AuditFlag, AuditShard
from app.core.config import Settings
from app.core.storage import ArtifactStore
from app.core.timeutil import as_utc, utcnow
from app.influence import AuditConfig, AuditResult, EngineError, FittedCurvature, run_audit
from app.influence import shards as sharding
from app.influence.adapters import SingleLogitAsTwoClasses
from app.influence.audit import set_up_audit, set_up_fold_audit
from app.influence.attribution import run_attribution

log = logging.getLogger("pbrf_audit.worker")
MAX_ATTEMPTS = 3


def _driver_errors() -> tuple[type[BaseException], ...]:
    """The database drivers' own error classes (a raw connection raises them unwrapped)."""
    import sqlite3

    found: list[type[BaseException]] = [sqlite3.Error]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        found.append(psycopg.Error)
    return tuple(found)


_DRIVER_ERRORS = _driver_errors()


class JobLost(Exception):
    """The job was cancelled, or another attempt owns it now: stop without writing anything."""


# How long a job's writes retry a transient database error (a SQLite lock held by another tenant's
# long write, a dropped PostgreSQL connection) before the attempt gives up and is requeued.
TRANSIENT_RETRY_SECONDS = 120.0


def _retrying(write, what: str):
    """Run `write()` (one transaction), again after a transient database error, with backoff, for up to
    TRANSIENT_RETRY_SECONDS: another tenant's long write must not fail this job."""
    deadline, delay = time.monotonic() + TRANSIENT_RETRY_SECONDS, 0.5
    while True:
        try:
            return write()
        except OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: transient database error, retrying in %.1f s (%s)", what, delay,
                        type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def _dead_local_worker(worker: str | None) -> bool:
    """True when `worker` (host:pid) names a process on this host that no longer exists: its job was
    lost with it (OOM kill, segfault), so a redelivered message need not wait for the heartbeat to go stale."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A killed pool child stays a zombie until its parent reaps it: it still answers kill(pid, 0).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def claim(session: Session, audit_id: uuid.UUID, worker_name: str, stale_after: float, table=Audit) -> str | None:
    """Compare-and-set: take a queued job, or a running one whose worker stopped heartbeating or is
    a dead process on this host (a redelivered message after a crash). `table`: the job's table (Audit,
    or Attribution, which has the same lifecycle columns)."""
    token = uuid.uuid4().hex
    now = utcnow()
    stale = now - timedelta(seconds=stale_after)
    current = session.get(table, audit_id)
    lost = current is not None and current.status == "running" and _dead_local_worker(current.worker)
    running_claimable = table.heartbeat_at < stale
    if lost:  # compare-and-set on the dead attempt's token so that only one redelivery wins
        running_claimable = table.claim_token == current.claim_token
    session.expire_all()
    claimable = or_(table.status == "queued", and_(table.status == "running", running_claimable))
    result = session.execute(
        update(table).where(table.id == audit_id, claimable, table.attempts < MAX_ATTEMPTS)
        .values(status="running", claim_token=token, attempts=table.attempts + 1, worker=worker_name,
                heartbeat_at=now, stage="loading", error=None)  # progress kept: it never goes back
    )
    if result.rowcount != 1:
        session.rollback()
        return None
    session.execute(update(table).where(table.id == audit_id, table.started_at.is_(None)).values(started_at=now))
    session.commit()
    return token


def _owned(audit_id: uuid.UUID, token: str, table=Audit):
    return and_(table.id == audit_id, table.claim_token == token, table.status == "running")


class _Watch:
    """A daemon thread that runs `check()` every `interval` seconds while the `with` block runs; a
    check sets `lost` when the job this process works for is gone."""

    def __init__(self, interval: float):
        self.interval = interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:
                log.exception("%s failed", type(self).__name__)

    def check(self) -> None:
        raise NotImplementedError


class Heartbeat(_Watch):
    """Writes heartbeat_at on a timer (covers long single steps such as eigendecompositions) and
    notices cancellation; the engine's progress callback checks `lost` at batch boundaries."""

    def __init__(self, factory: sessionmaker, audit_id: uuid.UUID, token: str, interval: float, table=Audit):
        super().__init__(interval)
        self.factory, self.audit_id, self.token, self.table = factory, audit_id, token, table

    def check(self) -> None:
        with self.factory() as session:
            result = session.execute(update(self.table).where(_owned(self.audit_id, self.token, self.table))
                                     .values(heartbeat_at=utcnow()))
            session.commit()
        if result.rowcount != 1:
            self.lost.set()


class ProgressWriter:
    """Engine progress callback: throttled progress/stage writes; raises JobLost when cancelled."""

    def __init__(self, factory: sessionmaker, audit_id: uuid.UUID, token: str, heartbeat: Heartbeat,
                 min_interval: float = 0.5):
        self.factory, self.audit_id, self.token, self.heartbeat = factory, audit_id, token, heartbeat
        self.table = heartbeat.table
        self.min_interval = min_interval
        self._last = 0.0
        self._stage = None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.heartbeat.lost.is_set():
            raise JobLost
        now = time.monotonic()
        if stage == self._stage and now - self._last < self.min_interval and fraction < 1.0:
            return
        self._last, self._stage = now, stage
        try:
            with self.factory() as session:
                # never lower (also across attempts: a new attempt's early passes leave the old value)
                value = round(0.98 * fraction, 4)
                progress = case((self.table.progress > value, self.table.progress), else_=value)
                result = session.execute(update(self.table).where(_owned(self.audit_id, self.token, self.table))
                                         .values(progress=progress, stage=stage, heartbeat_at=utcnow()))
                session.commit()
        except OperationalError:  # progress is best effort: the next report tries again
            log.warning("progress of %s %s not written (transient database error)", self.table.__tablename__,
                        self.audit_id)
            return
        if result.rowcount != 1:
            raise JobLost


def _fail(factory: sessionmaker, audit_id: uuid.UUID, token: str, message: str, table=Audit) -> None:
    def write():
        with factory() as session:
            failed = session.execute(update(table).where(_owned(audit_id, token, table)).values(
                status="failed", error=message[:4000], finished_at=utcnow(), stage="failed"))
            if table is Audit and failed.rowcount == 1:
                session.execute(delete(AuditShard).where(AuditShard.audit_id == audit_id))  # files become garbage
            session.commit()

    _retrying(write, f"failing {table.__tablename__} {audit_id}")


def _scores_file(result, labels: np.ndarray) -> bytes:
    arrays = {
        "score": result.scores.numpy().astype(np.float64),
        "loss": result.losses.numpy().astype(np.float64),
        "predicted_label": result.predicted.numpy().astype(np.int64),
        "given_label": labels.astype(np.int64),
        "given_label_probability": result.given_probability.numpy().astype(np.float64),
    }
    if result.self_influence is not None:
        arrays["self_influence"] = result.self_influence.numpy().astype(np.float64)
    for name, values in result.extras.items():
        arrays[name] = values.numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _extras_of(result, i: int) -> dict:
    extras = result.extras
    if not extras:
        return {"suggested_label": None, "suggested_label_probability": None, "out_of_sample_given_probability": None}
    return {"suggested_label": int(extras["suggested_label"][i]),
            "suggested_label_probability": float(extras["suggested_label_probability"][i]),
            "out_of_sample_given_probability": float(extras["out_of_sample_given_probability"][i])}


ATTEMPT_EXIT_CODES = {"succeeded": 0, "failed": 3, "lost": 4, "transient": 5}


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (PR_SET_PDEATHSIG), so that an attempt
    never outlives the worker process that watches it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except Exception:  # not Linux: the attempt's own heartbeat and token checks still stop it
        pass


# What the worker's imports (torch, onnx2pytorch, the service) take of the data segment before any job.
IMPORTS_DATA_BYTES = 1536 * 1024**2


def _limit_memory(settings: Settings) -> None:
    """In the attempt's process: the worker memory budget, so that a model whose activations are larger
    than its parameters suggest fails its audit readably instead of taking the machine's memory. On a
    CPU worker RLIMIT_DATA (beyond the imports); on a GPU worker the budget caps what torch's caching
    allocator may take of the GPU the audit runs on (the CUDA runtime maps host memory in ways a
    data-segment limit would break), and going past it is torch's OutOfMemoryError, named in _failed."""
    import resource

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, settings.worker_memory_bytes / total))
        return
    limit = IMPORTS_DATA_BYTES + settings.worker_memory_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def _share_cores(settings: Settings) -> None:
    """torch's threads in a job's process: PBRF_WORKER_THREADS, else the worker processes' share of the
    cores (torch's default of one thread per core in every process would have them fight over them)."""
    if torch.cuda.is_available():
        return
    if settings.worker_threads:
        torch.set_num_threads(settings.worker_threads)
    elif settings.worker_concurrency > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.worker_concurrency))


def _out_of_memory(exc: BaseException | str) -> bool:
    """An allocation refused (by the budget's limit, or by the machine; host or GPU), however it surfaced."""
    text = str(exc)
    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "Cannot allocate memory" in text or "CUDA out of memory" in text)


def _failed(exc: Exception, table, job_id: uuid.UUID, token: str, settings: Settings, factory: sessionmaker) -> str:
    """Fail an attempt with a message its owner can act on: the engine's or loader's own words, the
    memory budget or time limit it ran into, or an internal error (logged with its traceback)."""
    kind = table.__tablename__.replace("_", " ")
    if isinstance(exc, OperationalError):  # the database, not the job: another attempt will do (see _confined)
        log.warning("%s %s: transient database error (%s); the attempt is requeued", kind, job_id, type(exc).__name__)
        return "transient"
    if isinstance(exc, (EngineError, loaders.ArtifactError)):
        message = str(getattr(exc, "detail", exc))
        message = _memory_text(kind, settings) if _out_of_memory(message) else message
    elif type(exc).__name__ == "SoftTimeLimitExceeded":
        message = f"the {kind} exceeded its time limit of {settings.task_soft_time_limit} s"
    elif _out_of_memory(exc):
        message = _memory_text(kind, settings)
    elif (database := _database_error(exc)) is not None:
        # its text holds the statement and its parameters (the claim token among them): the log keeps them,
        # the tenant reads audit.error and gets the kind of error only
        log.error("%s %s failed on a database error:\n%s", kind, job_id, "".join(traceback.format_exception(exc)))
        message = (f"internal error while running the {kind}: the database refused to store or read its data "
                   f"({type(database).__name__}); the details are in the worker log")
    else:
        log.error("%s %s crashed:\n%s", kind, job_id, traceback.format_exc())
        message = f"internal error while running the {kind} ({type(exc).__name__}: {exc})"
    _fail(factory, job_id, token, message, table)
    return "failed"


def _database_error(exc: BaseException) -> BaseException | None:
    """The SQLAlchemy or driver error behind `exc` (itself, or its cause or context), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (SQLAlchemyError, *_DRIVER_ERRORS)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _memory_text(kind: str, settings: Settings) -> str:
    return (f"the {kind} needed more memory than the worker's budget of {settings.worker_memory_bytes / 1024**3:.1f} "
            "GiB (PBRF_WORKER_MEMORY_BYTES): the model's activations over one batch are larger than its size "
            "suggests; a smaller batch_size may fit")


def _run_in_child(settings: Settings, factory: sessionmaker, attempt, lost: threading.Event) -> tuple[str | None, int]:
    """Run `attempt()` (returns a status) in a child forked for it, while this process watches: when
    `lost` is set (set by a heartbeat or watcher thread of the caller) or the wall-clock limit passes,
    the child is killed at once, even in the middle of one long forward pass of a hostile model.
    Returns (why it was stopped: "lost", "time limit" or None, the child's exit code).

    Forked before this process starts any computation or touches torch's thread pools (it never
    computes): the child starts clean, and the model's memory and GPU state go with it."""
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _die_with_parent()
            factory.kw["bind"].dispose(close=False)  # the parent's pooled connections stay the parent's
            _limit_memory(settings)
            _share_cores(settings)
            code = ATTEMPT_EXIT_CODES.get(attempt(), 1)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    reason = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if lost.is_set():
                reason = "lost"
            elif time.monotonic() - started > settings.task_soft_time_limit + 1:
                # a backstop a second after Celery's own soft limit, which normally fires first: both at
                # once would interrupt the failure's own write
                reason = "time limit"
            if reason:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.1)
    except BaseException as exc:  # Celery's own time limit, or a worker shutdown: the child goes too
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if type(exc).__name__ != "SoftTimeLimitExceeded":
            raise
        reason, status = "time limit", 0
    return reason, os.waitstatus_to_exitcode(status)


def _confined(table, job_id: uuid.UUID, token: str, settings: Settings, factory: sessionmaker, attempt) -> str:
    """Run a claimed job's attempt in a child (_run_in_child) while this process heartbeats its row. A
    cancel (or another attempt taking the job) or the wall-clock limit PBRF_TASK_SOFT_TIME_LIMIT kills
    the child, and the worker is free for the next job. A child that dies on its own (the kernel's OOM
    killer, a crash in native code) puts the job back for another attempt, or fails it after MAX_ATTEMPTS."""
    kind = table.__tablename__
    with Heartbeat(factory, job_id, token, settings.heartbeat_seconds, table=table) as heartbeat:
        reason, code = _run_in_child(settings, factory, attempt, heartbeat.lost)
    if reason == "lost":
        log.info("%s %s was cancelled or re-claimed; its process was stopped", kind, job_id)
        return "lost"
    if reason == "time limit":
        _fail(factory, job_id, token, f"the {kind} exceeded its time limit of {settings.task_soft_time_limit} s "
              "(PBRF_TASK_SOFT_TIME_LIMIT)", table)
        return "failed"
    for name, value in ATTEMPT_EXIT_CODES.items():
        if code == value and name != "transient":
            return name
    # died without saying how, or gave up on the database: requeue this attempt (the reaper re-sends it),
    # or fail after the last
    cause = ("a transient database error" if code == ATTEMPT_EXIT_CODES["transient"] else
             f"signal {-code}" if code < 0 else f"exit code {code}")
    with factory() as session:
        attempts = session.scalar(select(table.attempts).where(table.id == job_id)) or MAX_ATTEMPTS
        values = ({"status": "queued", "claim_token": None, "enqueued_at": None,
                   "stage": f"requeued after its process stopped ({cause})"} if attempts < MAX_ATTEMPTS else
                  {"status": "failed", "finished_at": utcnow(), "stage": "failed",
                   "error": f"the process running this {kind} died {attempts} times ({cause}: out of memory, or a "
                            "crash in the model's native code)"})
        session.execute(update(table).where(_owned(job_id, token, table)).values(**values))
        session.commit()
    log.warning("%s %s: its process died (%s)", kind, job_id, cause)
    return "died"


def _stored_curvature(factory: sessionmaker, store: ArtifactStore, tenant: str, key: str | None):
    """((sha256, FittedCurvature), audit id) of the latest succeeded audit with this curvature key whose
    file is still stored, or (None, None): then the audit fits its own."""
    if key is None:
        return None, None
    with factory() as session:
        found = session.execute(select(Audit.id, Audit.curvature_sha256).where(
            Audit.tenant_id == tenant, Audit.curvature_key == key, Audit.status == "succeeded",
            Audit.curvature_sha256.is_not(None)).order_by(Audit.finished_at.desc()).limit(1)).first()
    if found is None:
        return None, None
    path = store.path_for(found.curvature_sha256)
    try:
        return (found.curvature_sha256, FittedCurvature.from_bytes(path.read_bytes())), str(found.id)
    except Exception:  # removed meanwhile or unreadable: fit again rather than fail
        log.warning("stored curvature %s of audit %s could not be read; fitting again", path, found.id)
        return None, None


def run_audit_job(audit_id: uuid.UUID, settings: Settings, factory: sessionmaker, worker_name: str | None = None) -> str:
    """Run one audit if it can be claimed, in a child process this one can stop (see _confined).
    Returns the final status seen by this attempt."""
    return _claim_and_run(Audit, audit_id, settings, factory, worker_name, _audit_attempt)


def _claim_and_run(table, job_id: uuid.UUID, settings: Settings, factory: sessionmaker, worker_name: str | None,
                   attempt) -> str:
    """Claim a job; if it is ours, run attempt(job_id, token, settings, factory) confined (_confined)."""
    worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
    with factory() as session:
        token = claim(session, job_id, worker_name, settings.stale_after_seconds, table=table)
    if token is None:
        log.info("%s %s not claimable (already taken, finished or cancelled)", table.__tablename__, job_id)
        return "skipped"
    return _confined(table, job_id, token, settings, factory, lambda: attempt(job_id, token, settings, factory))


def _load_training_set(store: ArtifactStore, model_row: ModelArtifact, dataset_row: DatasetArtifact,
                       settings: Settings):
    """A job's model (converted again from its stored bytes) and training set, the inputs packed as the
    model takes them (checked at creation from the records; checked again here on the arrays)."""
    loaded = loaders.load_model(store.path_for(model_row.sha256), model_row.format, model_row.architecture,
                                external_paths(store, model_row), check_reference=False)  # checked at upload
    dataset = loaders.load_dataset(store.path_for(dataset_row.sha256), dataset_row.format, dataset_limits(settings))
    return loaded, dataset, loaders.pack_inputs(dataset, loaded.inputs)


def _audit_attempt(audit_id: uuid.UUID, token: str, settings: Settings, factory: sessionmaker) -> str:
    """One claimed attempt at an audit: load, run the engine, write the results once."""
    with factory() as session:
        audit = session.get(Audit, audit_id)
        model_row = session.get(ModelArtifact, audit.model_id)
        dataset_row = session.get(DatasetArtifact, audit.dataset_id)
        params = dict(audit.params or {})
        method, damping = audit.method, audit.damping_requested
        key, tenant = audit.curvature_key, audit.tenant_id
    store = ArtifactStore(settings.storage_dir)
    try:
        with Heartbeat(factory, audit_id, token, settings.heartbeat_seconds) as heartbeat:
            progress = ProgressWriter(factory, audit_id, token, heartbeat)
            progress("loading", 0.0)
            loaded, dataset, inputs = _load_training_set(store, model_row, dataset_row, settings)
            model = loaded.module
            config = _audit_config(method, damping, params, settings)
            stored, reused_from = _stored_curvature(factory, store, tenant, key)
            inputs_t, labels_t = torch.from_numpy(inputs), torch.from_numpy(dataset.labels)
            shard_size = params.get("shard_size", settings.shard_size)
            not_sharded = None
            if config.method != "folds" and len(labels_t) > shard_size:
                not_sharded = sharding.why_not_sharded(config, set_up_audit(model, inputs_t, labels_t, config))
            if config.method == "folds":  # a task per fold, whatever the size: any idle worker takes some
                result = _run_fold_tasks(audit_id, tenant, settings, factory, store, progress, model, config,
                                         inputs_t, labels_t)
            elif len(labels_t) > shard_size and not_sharded is None:
                result = _run_sharded(audit_id, tenant, settings, factory, store, progress, model, config, inputs_t,
                                      labels_t, shard_size, stored)
            else:
                result = run_audit(model, inputs_t, labels_t, config, progress=progress,
                                   curvature=stored[1] if stored else None)
                if not_sharded is not None:
                    result.summary["shards"] = {"num_shards": 1, "not_sharded": not_sharded}
            if isinstance(model, SingleLogitAsTwoClasses):
                result.summary["model_output"] = ("one logit, read as a binary classifier: p(label 1) = sigmoid(logit), "
                                                  "audited as the two-class softmax over [0, logit] that equals it")
            progress("saving", 1.0)
            curvature_sha = None
            if result.curvature is not None and key is not None:
                curvature_sha = stored[0] if stored else store.put_bytes(result.curvature.to_bytes())
                result.summary["curvature"] = {
                    "sha256": curvature_sha, "size_bytes": store.path_for(curvature_sha).stat().st_size,
                    "reused_from_audit": reused_from,
                    "note": "fitted once per tenant, model, dataset, estimator and fitting settings (damping, "
                            "weight_decay, fisher_samples, seed); later audits with the same ones score with it"}
            # still heartbeating: saving a large result must not look like a dead worker
            scores_sha = store.put_bytes(_scores_file(result, dataset.labels))
            # the flags are one transaction: bounded, so that it never holds the database for long
            flagged = result.flagged.tolist()[: settings.max_flags]
            if len(flagged) < result.flagged.numel():
                result.summary["num_flags_stored"] = len(flagged)
                result.summary["flags_note"] = (
                    f"{result.flagged.numel()} examples were flagged; the {len(flagged)} most suspicious are stored "
                    "as flags (PBRF_MAX_FLAGS); every example's score is in /scores and /scores.csv")
            rows = [{"audit_id": audit_id, "rank": rank, "example_index": int(i), "given_label": int(dataset.labels[i]),
                     "predicted_label": int(result.predicted[i]), "score": float(result.scores[i]),
                     "loss": float(result.losses[i]), "given_label_probability": float(result.given_probability[i]),
                     **_extras_of(result, i)}
                    for rank, i in enumerate(flagged, start=1)]
            def write():
                with factory() as session:
                    # One transaction: stale rows from a crashed attempt are replaced, and the status flips
                    # only if this attempt still owns the job.
                    session.execute(delete(AuditFlag).where(AuditFlag.audit_id == audit_id))
                    session.execute(delete(AuditShard).where(AuditShard.audit_id == audit_id))
                    if rows:
                        session.execute(insert(AuditFlag), rows)
                    done = session.execute(update(Audit).where(_owned(audit_id, token)).values(
                        status="succeeded", progress=1.0, stage="done", finished_at=utcnow(), summary=result.summary,
                        damping=result.damping, scores_sha256=scores_sha, curvature_sha256=curvature_sha,
                        curvature_size_bytes=store.path_for(curvature_sha).stat().st_size if curvature_sha else None))
                    if done.rowcount != 1:
                        session.rollback()
                        raise JobLost
                    session.commit()

            _retrying(write, f"results of audit {audit_id}")
        log.info("audit %s succeeded (%d flags)", audit_id, len(rows))
        return "succeeded"
    except JobLost:
        log.info("audit %s was cancelled or re-claimed; attempt %s stops", audit_id, token)
        return "lost"
    except Exception as exc:
        return _failed(exc, Audit, audit_id, token, settings, factory)


def _audit_config(method: str, damping: float | None, params: dict, settings: Settings) -> AuditConfig:
    """The engine's settings of an audit: its recorded params as the API validated them, unchanged; a
    setting an older row does not record takes AuditConfig's default, which is the API's too."""
    known = {f.name for f in dataclasses.fields(AuditConfig)}
    recorded = {key: value for key, value in params.items() if key in known}
    return AuditConfig(**recorded | {"method": method, "damping": damping,
                                     "max_exact_parameters": settings.max_exact_parameters})


# ---------------------------------------------------------------------------------------- sharded audits
# An audit over more than shard_size examples is cut into shards (app/influence/shards.py). For each
# step (the estimator's fitting stages, then the scores) the audit's own attempt makes one AuditShard
# row per shard, sends a message per shard so that idle workers join in, and itself claims and runs
# shards until none is left to take; then it waits for the shards other workers hold, and reduces. The rows
# are the truth, as for audits: a shard is claimed by compare-and-set, heartbeats while it runs, and a
# shard whose process died is claimed again (by the coordinator, or by a later attempt of the audit,
# which keeps every shard already done). No Celery result backend or chord is needed.

# How long a helper's process stays up without a shard to run: the coordinator's reduce between
# steps (an eigendecomposition per layer) is usually shorter, and staying saves reloading the model
# and the data for the next step. It leaves at once when another job is waiting for a worker.
HELPER_IDLE_SECONDS = 20.0
# How often a sharded audit's processes look for shards to take or finished: every poll is one small
# indexed query, and a step's last shard or the next step's first is otherwise taken this much late.
SHARD_POLL_SECONDS = 0.05


def _shard_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return FittedCurvature(tensors, metadata or {}).to_bytes()  # the same safetensors file as a stored curvature


def _shard_file(store: ArtifactStore, sha: str) -> FittedCurvature:
    return FittedCurvature.from_bytes(store.path_for(sha).read_bytes())


def _compute_shard(store: ArtifactStore, model, config: AuditConfig, plan, step: str, index: int,
                   inputs: torch.Tensor, labels: torch.Tensor, state: FittedCurvature | None,
                   progress=None) -> tuple[str, float]:
    """Run one shard of one step; its result goes to the store. Returns (sha256, seconds)."""
    started = time.perf_counter()
    metadata = None
    if step == sharding.FOLDS:
        out, metadata = sharding.fold_shard(set_up_fold_audit(model, inputs, labels, config), plan, index, inputs,
                                            labels, progress)
    elif step == sharding.SCORES:
        out = sharding.score_shard(set_up_audit(model, inputs, labels, config), plan, index, inputs, labels, state,
                                   config.loss)
    else:
        out = sharding.fit_shard(set_up_audit(model, inputs, labels, config), plan, step, index, inputs, labels, state)
    return store.put_bytes(_shard_bytes(out, metadata)), time.perf_counter() - started


def _run_claimed_shard(factory: sessionmaker, settings: Settings, shard_id: uuid.UUID, token: str, compute) -> None:
    """Run `compute()` (returns (sha256, seconds)) for a shard this process claimed, heartbeating its
    row meanwhile, and record the result; JobLost when the claim was lost (audit ended, re-claimed)."""
    with Heartbeat(factory, shard_id, token, settings.heartbeat_seconds, table=AuditShard):
        sha, seconds = compute()
    _shard_done(factory, shard_id, token, sha, seconds)


def _shard_done(factory: sessionmaker, shard_id: uuid.UUID, token: str, sha: str, seconds: float) -> None:
    def write():
        with factory() as session:
            done = session.execute(update(AuditShard).where(_owned(shard_id, token, AuditShard)).values(
                status="succeeded", progress=1.0, stage="done", finished_at=utcnow(), result_sha256=sha,
                seconds=seconds))
            session.commit()
        return done.rowcount

    if _retrying(write, f"shard {shard_id}") != 1:
        raise JobLost


def _shard_rows(factory: sessionmaker, audit_id: uuid.UUID, tenant: str, plan: sharding.ShardPlan, step: str,
                input_sha: str | None) -> bool:
    """Make the step's shard rows unless an earlier attempt of the audit made them; True when made."""
    with factory() as session:
        exists = session.scalar(select(AuditShard.id).where(AuditShard.audit_id == audit_id, AuditShard.step == step)
                                .limit(1))
        if exists is not None:
            return False
        session.execute(insert(AuditShard), [
            {"id": uuid.uuid4(), "tenant_id": tenant, "audit_id": audit_id, "step": step, "shard_index": i,
             "plan": plan.to_dict(), "input_sha256": input_sha, "status": "queued", "progress": 0.0,
             "stage": "queued", "attempts": 0} for i in range(plan.num_shards)])
        session.commit()
    return True


def _announce_shards(factory: sessionmaker, audit_id: uuid.UUID, step: str) -> None:
    """One message per queued shard, so that idle workers take some (the coordinator takes the rest)."""
    from worker.celery_app import RUN_SHARD, celery_app

    with factory() as session:
        ids = session.scalars(select(AuditShard.id).where(AuditShard.audit_id == audit_id, AuditShard.step == step,
                                                          AuditShard.status == "queued")).all()
    for shard_id in ids:
        try:
            celery_app.send_task(RUN_SHARD, args=[str(shard_id)])
        except Exception:  # the broker is down: the coordinator runs them all itself
            log.warning("could not announce shard %s; the audit's own worker will run it", shard_id)
            return


def _drain_step(factory: sessionmaker, settings: Settings, audit_id: uuid.UUID, step: str, run_shard,
                report) -> list[str]:
    """Claim and run this step's shards until every one has succeeded; returns their results' digests
    in shard order. A shard that failed fails the audit with its error."""
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        with factory() as session:
            rows = session.execute(select(AuditShard.id, AuditShard.shard_index, AuditShard.status, AuditShard.error,
                                          AuditShard.result_sha256, AuditShard.attempts, AuditShard.worker,
                                          AuditShard.heartbeat_at)
                                   .where(AuditShard.audit_id == audit_id, AuditShard.step == step)
                                   .order_by(AuditShard.shard_index)).all()
        stale = utcnow() - timedelta(seconds=settings.stale_after_seconds)
        for row in rows:
            if row.status in ("failed", "cancelled"):
                raise EngineError(f"shard {row.shard_index + 1} of {len(rows)} ({step}) {row.status}: {row.error}")
            lost = row.status == "running" and (_dead_local_worker(row.worker) or (
                row.heartbeat_at is not None and as_utc(row.heartbeat_at) < stale))
            if lost and row.attempts >= MAX_ATTEMPTS:  # no claim would take it again
                raise EngineError(f"shard {row.shard_index + 1} of {len(rows)} ({step}): the process running it died "
                                  f"{row.attempts} times (out of memory, or a crash in the model's native code)")
        done = sum(row.status == "succeeded" for row in rows)
        report(done, len(rows))
        if done == len(rows):
            return [row.result_sha256 for row in rows]
        ran = False
        for row in rows:
            if row.status == "succeeded":
                continue
            with factory() as session:
                token = claim(session, row.id, worker_name, settings.stale_after_seconds, table=AuditShard)
            if token is not None:
                _run_claimed_shard(factory, settings, row.id, token, lambda: run_shard(row.shard_index))
                ran = True
                break
        if not ran:
            time.sleep(SHARD_POLL_SECONDS)  # the others are running elsewhere


def _run_sharded(audit_id: uuid.UUID, tenant: str, settings: Settings, factory: sessionmaker, store: ArtifactStore,
                 progress, model, config: AuditConfig, inputs: torch.Tensor, labels: torch.Tensor, shard_size: int,
                 stored) -> AuditResult:
    started = time.perf_counter()
    plan = sharding.ShardPlan.make(set_up_audit(model, inputs, labels, config), len(labels), shard_size,
                                   fit=stored is None)
    state, state_sha = (stored[1], stored[0]) if stored else (None, None)
    total = plan.num_shards * len(plan.stages)
    timings: dict[str, float] = {}
    for position, step in enumerate(plan.stages):
        t0 = time.perf_counter()
        if _shard_rows(factory, audit_id, tenant, plan, step, state_sha) and plan.num_shards > 1:
            _announce_shards(factory, audit_id, step)

        def report(done: int, count: int, position=position, step=step) -> None:
            progress(f"{step}: {done} of {count} shards", (position * plan.num_shards + done) / total)

        def run_shard(index: int, step=step, state=state) -> tuple[str, float]:
            return _compute_shard(store, model, config, plan, step, index, inputs, labels, state)

        digests = _drain_step(factory, settings, audit_id, step, run_shard, report)
        results = (_shard_file(store, sha).tensors for sha in digests)  # read one at a time
        if step == sharding.SCORES:
            parts = list(results)
        else:
            state = sharding.finish_stage(set_up_audit(model, inputs, labels, config), plan, step, results, inputs,
                                          state)
            state_sha = store.put_bytes(state.to_bytes())
        timings[step] = time.perf_counter() - t0
    result = sharding.conclude_sharded(config, set_up_audit(model, inputs, labels, config), plan, inputs, labels,
                                       parts, state, timings, started, stored is not None)
    _record_shard_runs(factory, audit_id, result)
    return result


def _record_shard_runs(factory: sessionmaker, audit_id: uuid.UUID, result: AuditResult) -> None:
    """Which processes ran the audit's shards, and how many runs that took (above the shard count when
    some shard was run again after its process died)."""
    with factory() as session:
        workers = dict(session.execute(select(AuditShard.worker, func.count()).where(AuditShard.audit_id == audit_id)
                                       .group_by(AuditShard.worker)).all())
        runs = session.scalar(select(func.sum(AuditShard.attempts)).where(AuditShard.audit_id == audit_id))
    result.summary["shards"]["shards_per_process"] = {str(k): int(v) for k, v in workers.items()}
    result.summary["shards"]["shard_runs"] = int(runs or 0)


def _run_fold_tasks(audit_id: uuid.UUID, tenant: str, settings: Settings, factory: sessionmaker, store: ArtifactStore,
                    progress, model, config: AuditConfig, inputs: torch.Tensor, labels: torch.Tensor) -> AuditResult:
    """Method `folds`: one shard row per fold, announced so that idle workers each unlearn a fold while
    this attempt runs the rest (a fold that already succeeded in an earlier attempt is kept), then the
    out-of-fold probabilities are joined and flagged here. Each fold is seeded by its index alone, so
    the audit gives the same scores on one worker or on several."""
    started = time.perf_counter()
    setup = set_up_fold_audit(model, inputs, labels, config)
    plan = sharding.FoldPlan(num_examples=len(labels), folds=config.folds)
    if _shard_rows(factory, audit_id, tenant, plan, sharding.FOLDS, None):
        _announce_shards(factory, audit_id, sharding.FOLDS)
    finished = [0]

    def report(done: int, count: int) -> None:
        finished[0] = done
        progress(f"folds: {done} of {count} done", 0.02 + 0.95 * done / count)

    def run_fold(index: int) -> tuple[str, float]:
        # the folds this process runs itself move the progress within the fold too
        def within(fraction: float) -> None:
            progress(f"folds: {finished[0]} of {plan.folds} done, fold {index + 1} training",
                     0.02 + 0.95 * (finished[0] + fraction) / plan.folds)
        return _compute_shard(store, model, config, plan, sharding.FOLDS, index, inputs, labels, None, within)

    t0 = time.perf_counter()
    digests = _drain_step(factory, settings, audit_id, sharding.FOLDS, run_fold, report)
    seconds = time.perf_counter() - t0
    outcomes = [sharding.fold_outcome(file.tensors, file.metadata)
                for file in (_shard_file(store, sha) for sha in digests)]
    result = sharding.conclude_folds_sharded(config, setup, plan, inputs, labels, outcomes, {"folds": seconds}, started)
    _record_shard_runs(factory, audit_id, result)
    return result


class AuditWatch(_Watch):
    """A helper's watch on the audit it helps: `lost` is set once the audit has ended (cancelled,
    failed, finished, deleted), and the helper's process is then stopped. An audit put back in the
    queue (its own process died; the next attempt keeps every shard that succeeded) does not stop the
    helper: the shard it is running is still wanted, and killing it would only make the next attempt
    run it again. The helper leaves at its next shard boundary (_help_audit)."""

    def __init__(self, factory: sessionmaker, audit_id: uuid.UUID, interval: float):
        super().__init__(interval)
        self.factory, self.audit_id = factory, audit_id

    def check(self) -> None:
        with self.factory() as session:
            if session.scalar(select(Audit.status).where(Audit.id == self.audit_id)) not in ("running", "queued"):
                self.lost.set()


def _next_queued_shard(session: Session, audit_id: uuid.UUID):
    """The audit's queued shard with the lowest index (only one step has queued shards at a time)."""
    return session.execute(select(AuditShard.id, AuditShard.shard_index, AuditShard.step, AuditShard.plan,
                                  AuditShard.input_sha256)
                           .where(AuditShard.audit_id == audit_id, AuditShard.status == "queued")
                           .order_by(AuditShard.shard_index).limit(1)).first()


def _job_waiting(session: Session) -> bool:
    """Another audit or attribution is queued: a helper gives its worker back to it."""
    return any(session.scalar(select(table.id).where(table.status == "queued").limit(1)) is not None
               for table in (Audit, Attribution))


def run_shard_job(shard_id: uuid.UUID, settings: Settings, factory: sessionmaker, worker_name: str | None = None) -> str:
    """Help the sharded audit that announced this shard: in a child process, load its model and data
    once and run its queued shards, step after step, until it has none left to give (see _help_audit).
    The audit's own attempt runs whatever no helper took. Returns "skipped" when there is nothing to take."""
    with factory() as session:
        shard = session.get(AuditShard, shard_id)
        audit_id = shard.audit_id if shard is not None else None
        wanted = (audit_id is not None
                  and session.scalar(select(Audit.status).where(Audit.id == audit_id)) == "running"
                  and _next_queued_shard(session, audit_id) is not None)
    if not wanted:
        return "skipped"
    with AuditWatch(factory, audit_id, settings.heartbeat_seconds) as watch:
        reason, code = _run_in_child(settings, factory, lambda: _help_audit(audit_id, settings, factory), watch.lost)
    # A shard this helper held when it stopped or died is claimed again at once by the audit's attempt
    # (its holder is a dead process on this host) or after its heartbeat goes stale (another host).
    if reason is not None:
        log.info("helper of audit %s stopped (%s)", audit_id, reason)
        return "lost" if reason == "lost" else "failed"
    return next((name for name, value in ATTEMPT_EXIT_CODES.items() if code == value), "died")


def _help_audit(audit_id: uuid.UUID, settings: Settings, factory: sessionmaker) -> str:
    """The helper's child: claim and run the audit's queued shards while the audit runs; wait up to
    HELPER_IDLE_SECONDS for the next step's; leave at a shard boundary when another job is waiting."""
    started = time.monotonic()
    with factory() as session:
        audit = session.get(Audit, audit_id)
        model_row = session.get(ModelArtifact, audit.model_id)
        dataset_row = session.get(DatasetArtifact, audit.dataset_id)
        config = _audit_config(audit.method, audit.damping_requested, dict(audit.params or {}), settings)
    store = ArtifactStore(settings.storage_dir)
    try:
        loaded, dataset, inputs = _load_training_set(store, model_row, dataset_row, settings)
    except Exception:  # the audit's own attempt loaded the same bytes and will say what is wrong
        log.exception("helper of audit %s could not load its model or data", audit_id)
        return "failed"
    inputs_t, labels_t = torch.from_numpy(inputs), torch.from_numpy(dataset.labels)
    log.info("helper of audit %s loaded its model and data in %.2f s", audit_id, time.monotonic() - started)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"  # this process: a claim dies with it
    state_sha, state = None, None
    idle_since = None
    while True:
        with factory() as session:
            if session.scalar(select(Audit.status).where(Audit.id == audit_id)) != "running" or _job_waiting(session):
                return "succeeded"
            shard = _next_queued_shard(session, audit_id)
            token = None if shard is None else claim(session, shard.id, worker_name, settings.stale_after_seconds,
                                                     table=AuditShard)
        if shard is None:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > HELPER_IDLE_SECONDS:
                return "succeeded"
            time.sleep(SHARD_POLL_SECONDS)
            continue
        idle_since = None
        if token is None:
            continue  # another worker was quicker
        try:
            if shard.input_sha256 != state_sha:
                state_sha = shard.input_sha256
                state = FittedCurvature.from_bytes(store.path_for(state_sha).read_bytes()) if state_sha else None
            _run_claimed_shard(factory, settings, shard.id, token, lambda: _compute_shard(
                store, loaded.module, config, sharding.plan_from_dict(shard.plan), shard.step, shard.shard_index,
                inputs_t, labels_t, state))
        except JobLost:
            continue  # the audit ended or re-claimed the shard: the loop's next check decides
        except Exception as exc:  # the shard fails, and the audit's attempt fails the audit with its error
            _failed(exc, AuditShard, shard.id, token, settings, factory)
            return "succeeded"


def run_attribution_job(attribution_id: uuid.UUID, settings: Settings, factory: sessionmaker,
                        worker_name: str | None = None) -> str:
    """Attribute each query of an attribution to training examples with its audit's stored curvature
    (claimed, heartbeating and written once, like an audit). Returns the final status of this attempt."""
    return _claim_and_run(Attribution, attribution_id, settings, factory, worker_name, _attribution_attempt)


def _attribution_attempt(attribution_id: uuid.UUID, token: str, settings: Settings, factory: sessionmaker) -> str:
    with factory() as session:
        row = session.get(Attribution, attribution_id)
        audit = session.get(Audit, row.audit_id)
        model_row = session.get(ModelArtifact, audit.model_id)
        dataset_row = session.get(DatasetArtifact, audit.dataset_id)
        query_sha, query_format, top_k = row.query_sha256, row.query_format, row.top_k
        curvature_sha, batch_size = audit.curvature_sha256, (audit.params or {}).get("batch_size")
    store = ArtifactStore(settings.storage_dir)
    try:
        with Heartbeat(factory, attribution_id, token, settings.heartbeat_seconds, table=Attribution) as heartbeat:
            progress = ProgressWriter(factory, attribution_id, token, heartbeat)
            progress("loading", 0.0)
            loaded, dataset, inputs = _load_training_set(store, model_row, dataset_row, settings)
            queries = loaders.load_dataset(store.path_for(query_sha), query_format, dataset_limits(settings))
            curvature = FittedCurvature.from_bytes(store.path_for(curvature_sha).read_bytes())
            found = run_attribution(loaded.module, torch.from_numpy(inputs), torch.from_numpy(dataset.labels),
                                    torch.from_numpy(loaders.pack_inputs(queries, loaded.inputs)),
                                    torch.from_numpy(queries.labels), curvature, top_k=top_k, progress=progress,
                                    batch_size=batch_size)
            progress("saving", 1.0)
            buffer = io.BytesIO()
            np.savez(buffer, helpful=found.helpful.numpy(), helpful_scores=found.helpful_scores.numpy(),
                     harmful=found.harmful.numpy(), harmful_scores=found.harmful_scores.numpy())
            results_sha = store.put_bytes(buffer.getvalue())
            def write():
                with factory() as session:
                    done = session.execute(update(Attribution).where(_owned(attribution_id, token, Attribution))
                                           .values(status="succeeded", progress=1.0, stage="done",
                                                   finished_at=utcnow(), results_sha256=results_sha))
                    if done.rowcount != 1:
                        session.rollback()
                        raise JobLost
                    session.commit()

            _retrying(write, f"results of attribution {attribution_id}")
        return "succeeded"
    except JobLost:
        return "lost"
    except Exception as exc:
        return _failed(exc, Attribution, attribution_id, token, settings, factory)


def reap(factory: sessionmaker, settings: Settings, send, table=Audit) -> list[uuid.UUID]:
    """Re-enqueue what a crash or a broker loss left behind; returns the ids it re-sent.

    - running with a stale heartbeat, or whose worker process on this host is gone: back to queued
      (or failed after MAX_ATTEMPTS);
    - queued and never sent, or sent long ago without being claimed: the message may be lost.
    Duplicate messages are harmless: the claim lets one through. `table`: Audit or Attribution.
    """
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_seconds)
    resend: list[uuid.UUID] = []
    with factory() as session:
        running = session.scalars(select(table).where(table.status == "running")).all()
        for audit in running:
            stale_heartbeat = audit.heartbeat_at is not None and as_utc(audit.heartbeat_at) < stale
            dead_here = _dead_local_worker(audit.worker)  # its process is gone: no need to wait
            if not (stale_heartbeat or dead_here):
                continue
            if audit.attempts >= MAX_ATTEMPTS:
                values = {"status": "failed", "finished_at": now, "stage": "failed",
                          "error": f"the worker running this {table.__tablename__} was lost {audit.attempts} times "
                                   "(crash or out of memory)"}
            else:
                values = {"status": "queued", "claim_token": None, "stage": "requeued after a lost worker",
                          "enqueued_at": None}
            guard = [table.id == audit.id, table.status == "running", table.claim_token == audit.claim_token]
            if not dead_here:
                guard.append(table.heartbeat_at < stale)  # a heartbeat since the SELECT means it is alive
            # not evaluated against the loaded rows: SQLite gives them back without a time zone
            session.execute(update(table).where(*guard).values(**values)
                            .execution_options(synchronize_session=False))
        session.commit()
        # A message counts as lost when it was never sent, or was sent long ago while no worker is busy
        # (a busy worker means the queue is simply waiting: re-sending then would only pile up duplicates).
        busy = session.scalar(select(table.id).where(table.status == "running", table.heartbeat_at >= stale).limit(1))
        lost = table.enqueued_at.is_(None) if busy else or_(table.enqueued_at.is_(None), table.enqueued_at < stale)
        waiting = session.scalars(select(table.id).where(table.status == "queued", lost)).all()
        for audit_id in waiting:
            try:
                send(audit_id)
            except Exception:
                log.exception("reaper could not enqueue audit %s", audit_id)
                continue
            session.execute(update(table).where(table.id == audit_id).values(enqueued_at=utcnow()))
            resend.append(audit_id)
        session.commit()
    return resend
