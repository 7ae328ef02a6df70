"""The Celery app, built from Settings. Delivery is at-least-once; tasks are idempotent."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready
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
from triage.heartbeat import WorkerHeartbeatThread
from workers.context import WorkerContext
from workers.tasks import register_tasks

log = logging.getLogger(__name__)

WARM_UP_TIMEOUT_SECONDS = 300.0


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
    context = WorkerContext(settings)
    register_tasks(app, context)
    # Each process that runs tasks (the solo pool's own, or every prefork child) loads and warms
    # its models before it takes a job; the pool waits for a child that long.
    app.conf.worker_proc_alive_timeout = WARM_UP_TIMEOUT_SECONDS
    worker_process_init.connect(lambda **_: warm(context), weak=False, dispatch_uid="triage-warm")
    worker_ready.connect(
        lambda sender, **_: start_heartbeat(context, sender),
        weak=False,
        dispatch_uid="triage-heartbeat",
    )
    return app


def start_heartbeat(context: WorkerContext, consumer: Any) -> None:
    """Once the worker consumes: its heartbeat, with the queues it consumes (``status``)."""
    queues = sorted(consumer.app.amqp.queues.consume_from or consumer.app.amqp.queues)
    WorkerHeartbeatThread(context.session_factory, queues).start()


def warm(context: WorkerContext) -> None:
    started = time.perf_counter()
    warmed = context.registry.warm_all()
    log.info(
        "models warm",
        extra={"models": warmed, "seconds": round(time.perf_counter() - started, 3)},
    )
