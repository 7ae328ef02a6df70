"""The Celery broker as triage sees it: its URL, queue names, task names, queue depths.

triage sends tasks by name and never imports ``workers``.
"""

from __future__ import annotations

import logging

from kombu import Connection

from triage.config import Settings

log = logging.getLogger(__name__)

INFERENCE_QUEUE = "inference"
DISPATCH_QUEUE = "dispatch"
QUEUES = (INFERENCE_QUEUE, DISPATCH_QUEUE)

ANALYZE_STUDY_TASK = "triage.analyze_study"
DISPATCH_RESULT_TASK = "triage.dispatch_result"


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded one: kombu's SQLAlchemy transport on SQLite."""
    if settings.broker_url:
        return settings.broker_url
    return f"sqla+sqlite:///{settings.data_dir / 'broker.sqlite'}"


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
