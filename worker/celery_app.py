"""The Celery application. Light to import: the API imports it to send messages by task name.

Long GPU jobs: late acks + reject on worker loss (a killed child re-queues its message), prefetch 1,
JSON only, no result backend (the audit row in the database is the only status), soft < hard time
limit < broker visibility timeout. The embedded default uses kombu's filesystem:// transport, which
loses a message if the worker dies mid-task; the database reaper covers that.
"""

from __future__ import annotations

from celery import Celery

from app.core.config import Settings, get_settings

RUN_AUDIT = "pbrf.run_audit"
RUN_ATTRIBUTION = "pbrf.run_attribution"
RUN_SHARD = "pbrf.run_shard"  # one shard of a sharded audit (worker/jobs.py)


def make_celery(settings: Settings) -> Celery:
    app = Celery("pbrf_audit")
    transport_options: dict = {"visibility_timeout": settings.broker_visibility_timeout}
    if settings.embedded_broker:
        queue = settings.queue_dir.resolve()
        for sub in ("messages", "processed", "control"):
            (queue / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(queue / "messages"),
            "data_folder_out": str(queue / "messages"),
            "control_folder": str(queue / "control"),
            "processed_folder": str(queue / "processed"),
            "store_processed": False,
            # kombu's default is a listing per second: a sharded audit's announced shards would wait
            "polling_interval": 0.2,
        }
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue_name,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        include=["worker.tasks"],
    )
    return app


celery_app = make_celery(get_settings())
