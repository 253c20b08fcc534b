"""Celery tasks. CUDA is only touched inside the task (the prefork child), never at import."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.core.config import get_settings
from app.core.db import get_engine, get_sessionmaker

from .celery_app import RUN_ATTRIBUTION, RUN_AUDIT, RUN_SHARD, celery_app
from .jobs import reap, run_attribution_job, run_audit_job, run_shard_job

log = logging.getLogger("pbrf_audit.worker")
_reaper_stop = threading.Event()


@celery_app.task(name=RUN_AUDIT, acks_late=True, reject_on_worker_lost=True)
def run_audit_task(audit_id: str) -> str:
    return run_audit_job(uuid.UUID(audit_id), get_settings(), get_sessionmaker())


def send_audit(audit_id: uuid.UUID) -> None:
    celery_app.send_task(RUN_AUDIT, args=[str(audit_id)])


@celery_app.task(name=RUN_ATTRIBUTION, acks_late=True, reject_on_worker_lost=True)
def run_attribution_task(attribution_id: str) -> str:
    return run_attribution_job(uuid.UUID(attribution_id), get_settings(), get_sessionmaker())


@celery_app.task(name=RUN_SHARD, acks_late=True, reject_on_worker_lost=True)
def run_shard_task(shard_id: str) -> str:
    return run_shard_job(uuid.UUID(shard_id), get_settings(), get_sessionmaker())


def send_attribution(attribution_id: uuid.UUID) -> None:
    celery_app.send_task(RUN_ATTRIBUTION, args=[str(attribution_id)])


_last_collection = 0.0


def _collect_garbage(settings) -> None:
    """Stored bytes of deleted models, datasets and audits: removed once no row refers to them. It
    reads every digest and lists the store, so it runs at most every quarter of the grace period."""
    global _last_collection
    from app.audits.service import referenced_digests
    from app.core.storage import ArtifactStore

    if time.monotonic() - _last_collection < settings.garbage_grace_seconds / 4:
        return
    _last_collection = time.monotonic()
    with get_sessionmaker()() as session:
        referenced = referenced_digests(session)
    removed = ArtifactStore(settings.storage_dir).collect_garbage(referenced, settings.garbage_grace_seconds)
    if removed:
        log.info("removed %d stored files no longer referenced", len(removed))


def _reaper_loop() -> None:
    settings = get_settings()
    while True:
        try:
            from app.audits.tables import Attribution

            requeued = reap(get_sessionmaker(), settings, send_audit)
            if requeued:
                log.warning("reaper re-enqueued audits %s", [str(a) for a in requeued])
            requeued = reap(get_sessionmaker(), settings, send_attribution, table=Attribution)
            if requeued:
                log.warning("reaper re-enqueued attributions %s", [str(a) for a in requeued])
            _collect_garbage(settings)
        except Exception:
            log.exception("reaper pass failed")
        if _reaper_stop.wait(settings.reaper_interval_seconds):
            return


@worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs) -> None:
    # A forked pool process must not reuse the parent's pooled connections (the reaper thread holds
    # some): drop them without closing the parent's sockets.
    get_engine().dispose(close=False)


@worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    # Runs in the worker's main process: it outlives crashed pool children.
    threading.Thread(target=_reaper_loop, name="pbrf-reaper", daemon=True).start()


@worker_shutting_down.connect
def _stop_reaper(**_kwargs) -> None:
    _reaper_stop.set()
