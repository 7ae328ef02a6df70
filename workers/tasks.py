"""Celery tasks: thin, idempotent, taking ids. Retryable errors retry with backoff; others fail
the job with its reason."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from triage.broker import ANALYZE_STUDY_TASK, DISPATCH_RESULT_TASK
from triage.errors import RetryableError
from workers.analysis import analyze, fail
from workers.context import WorkerContext
from workers.dispatch import dispatch

log = logging.getLogger(__name__)

MAX_RETRIES = 5


def register_tasks(app: Celery, context: WorkerContext) -> None:
    @app.task(  # type: ignore[untyped-decorator]
        name=ANALYZE_STUDY_TASK,
        bind=True,
        max_retries=MAX_RETRIES,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def analyze_study(task: Any, job_id: int) -> str:
        try:
            return analyze(context, job_id)
        except RetryableError as exc:
            final = task.request.retries >= MAX_RETRIES
            fail(context, job_id, f"{type(exc).__name__}: {exc}", final=final)
            if final:
                return "failed"
            raise task.retry(exc=exc, countdown=min(300, 5 * 2**task.request.retries)) from exc
        except Exception as exc:  # permanent: record it, do not retry
            log.exception("job failed", extra={"job_id": job_id})
            fail(context, job_id, f"{type(exc).__name__}: {exc}", final=True)
            return "failed"

    @app.task(  # type: ignore[untyped-decorator]
        name=DISPATCH_RESULT_TASK,
        bind=True,
        max_retries=None,  # the delivery row counts attempts (delivery_max_attempts)
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def dispatch_result(task: Any, delivery_id: int) -> str:
        outcome = dispatch(context, delivery_id)
        if outcome.retry_in is not None:
            raise task.retry(countdown=outcome.retry_in)
        return outcome.state
