"""The Celery app, built from Settings. Delivery is at-least-once; tasks are idempotent."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from triage.broker import (
    ANALYZE_STUDY_TASK,
    DISPATCH_QUEUE,
    DISPATCH_RESULT_TASK,
    INFERENCE_QUEUE,
    broker_url,
    transport_options,
)
from triage.config import Settings
from workers.context import WorkerContext
from workers.tasks import register_tasks


def create_celery(settings: Settings) -> Celery:
    """A Celery app on the configured broker, or on the embedded SQLite one."""
    app = Celery("triage", broker=broker_url(settings), set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=INFERENCE_QUEUE,
        task_queues=(Queue(INFERENCE_QUEUE), Queue(DISPATCH_QUEUE)),
        task_routes={
            ANALYZE_STUDY_TASK: {"queue": INFERENCE_QUEUE},
            DISPATCH_RESULT_TASK: {"queue": DISPATCH_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if settings.embedded_broker:
        # kombu's SQLAlchemy transport polls; passing this in transport options breaks it.
        app.conf.broker_polling_interval = 0.1
    register_tasks(app, WorkerContext(settings))
    return app
