"""Celery tasks: thin, idempotent, taking ids. Retryable errors retry after the shared backoff
(``triage.retry``); others fail the job with its reason."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from triage.broker import ANALYZE_STUDY_TASK, DISPATCH_RESULT_TASK
from triage.errors import RetryableError
from triage.retry import Backoff
from workers.analysis import JobOutcome, analyze, record_job_failure
from workers.context import WorkerContext
from workers.dispatch import DeliveryOutcome, dispatch

log = logging.getLogger(__name__)


def register_tasks(app: Celery, context: WorkerContext) -> None:
    backoff = Backoff.from_settings(context.settings)
    job_retries = context.settings.job_max_attempts - 1

    @app.task(  # type: ignore[untyped-decorator]
        name=ANALYZE_STUDY_TASK,
        bind=True,
        max_retries=job_retries,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def analyze_study(task: Any, job_id: int) -> JobOutcome:
        try:
            return analyze(context, job_id)
        except RetryableError as exc:
            final = task.request.retries >= job_retries
            record_job_failure(context, job_id, f"{type(exc).__name__}: {exc}", final=final)
            if final:
                return JobOutcome.FAILED
            countdown = backoff.delay(task.request.retries + 1)
            raise task.retry(exc=exc, countdown=countdown) from exc
        except Exception as exc:  # permanent: record it, do not retry
            log.exception("job failed", extra={"job_id": job_id})
            record_job_failure(context, job_id, f"{type(exc).__name__}: {exc}", final=True)
            return JobOutcome.FAILED

    @app.task(  # type: ignore[untyped-decorator]
        name=DISPATCH_RESULT_TASK,
        bind=True,
        max_retries=None,  # the delivery row counts attempts (delivery_max_attempts)
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def dispatch_result(task: Any, delivery_id: int) -> DeliveryOutcome:
        outcome = dispatch(context, delivery_id)
        if outcome.retry_in is not None:
            raise task.retry(countdown=outcome.retry_in)
        return outcome.state
