"""The Celery broker as triage sees it: its URL, queue names, task names, queue depths.

triage sends tasks by name and never imports ``workers``.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu import Connection
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport

from triage.config import Settings

log = logging.getLogger(__name__)

EMBEDDED_TRANSPORT = "triage-sqla"
EMBEDDED_POLL_SECONDS = 0.1


class EmbeddedTransport(SQLAlchemyTransport):  # type: ignore[misc]
    """kombu's SQLAlchemy transport, polled every 0.1 s instead of every second: an idle
    worker takes a new job within 0.1 s. (Celery has no setting for it, and the transport hands
    its options to create_engine.)"""

    polling_interval = EMBEDDED_POLL_SECONDS


# A broker URL names its transport by alias only (no dots or colons): register ours.
TRANSPORT_ALIASES[EMBEDDED_TRANSPORT] = f"{__name__}:EmbeddedTransport"

INFERENCE_QUEUE = "inference"
DISPATCH_QUEUE = "dispatch"
QUEUES = (INFERENCE_QUEUE, DISPATCH_QUEUE)

ANALYZE_STUDY_TASK = "triage.analyze_study"
DISPATCH_RESULT_TASK = "triage.dispatch_result"


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded one: kombu's SQLAlchemy transport on SQLite
    (``EmbeddedTransport``)."""
    if settings.broker_url:
        return settings.broker_url
    return f"{EMBEDDED_TRANSPORT}+sqlite:///{settings.data_dir / 'broker.sqlite'}"


def transport_options(settings: Settings) -> dict[str, float]:
    """Redis redelivers unacknowledged tasks after the visibility timeout. kombu's SQLAlchemy
    transport hands its options to create_engine, so the embedded broker gets none."""
    if settings.embedded_broker:
        return {}
    return {"visibility_timeout": settings.visibility_timeout_seconds}


class TaskSender:
    """Sends tasks by name. A failed send leaves the job queued in the database, where the
    sweeper finds it again: the broker is never the only record of owed work."""

    def __init__(self, settings: Settings) -> None:
        self.app = Celery("triage", broker=broker_url(settings), set_as_current=False)
        self.app.conf.broker_transport_options = transport_options(settings)
        self.app.conf.broker_connection_retry = False
        self.app.conf.broker_connection_max_retries = 0

    def analyze_study(self, job_id: int) -> bool:
        return self._send(ANALYZE_STUDY_TASK, job_id, INFERENCE_QUEUE)

    def dispatch_result(self, delivery_id: int) -> bool:
        return self._send(DISPATCH_RESULT_TASK, delivery_id, DISPATCH_QUEUE)

    def _send(self, task: str, object_id: int, queue: str) -> bool:
        try:
            self.app.send_task(task, args=[object_id], queue=queue, retry=False)
        except Exception as exc:  # any broker failure: the sweeper resends later
            log.warning(
                "could not send task: %s", type(exc).__name__, extra={"task": task, "id": object_id}
            )
            return False
        return True

    def close(self) -> None:
        self.app.close()


def queue_depths(url: str, *, timeout: float = 2.0) -> dict[str, int | None]:
    """Messages waiting in each queue; None where the broker cannot be asked."""
    depths: dict[str, int | None] = dict.fromkeys(QUEUES)
    try:
        with Connection(url, connect_timeout=timeout, transport_options={"max_retries": 0}) as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.default_channel
            for queue in QUEUES:
                # durable=True matches how Celery declares its queues.
                declared = channel.queue_declare(queue=queue, durable=True, passive=False)
                depths[queue] = int(declared.message_count)
    except Exception as exc:  # any broker failure only makes the figure unknown
        log.warning("broker queue depth unavailable: %s", type(exc).__name__)
    return depths
