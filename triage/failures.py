"""Failed jobs and deliveries: what ``triage-admin failures list|retry`` shows and re-queues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.db.base import utcnow
from triage.db.models import Delivery, Job, ResultObject, Study
from triage.domain import StudyStatus, WorkState


@dataclass(frozen=True)
class Failure:
    kind: str  # "job" or "delivery"
    id: int
    study_uid: str
    what: str  # model, or result kind -> destination
    attempts: int
    max_attempts: int
    reason: str
    at: datetime | None

    @property
    def permanent(self) -> bool:
        """It failed before its last attempt: the error was one that retrying does not fix
        (a malformed dataset, a refused SOP class, a destination no longer configured)."""
        return self.attempts < self.max_attempts


def list_failures(
    *, db_session: Session, job_max_attempts: int, delivery_max_attempts: int
) -> list[Failure]:
    """Failed jobs, then failed deliveries, oldest first; ``*_max_attempts`` are the
    settings that tell a failure retried to the end from one given up at once."""
    failures = [
        Failure(
            "job",
            job.id,
            study_uid,
            f"{job.model_name} {job.model_version}",
            job.attempts,
            job_max_attempts,
            job.reason or "",
            job.finished_at,
        )
        for job, study_uid in db_session.execute(
            select(Job, Study.study_uid)
            .join(Study, Job.study_id == Study.id)
            .where(Job.state == WorkState.FAILED)
            .order_by(Job.id)
        )
    ]
    failures += [
        Failure(
            "delivery",
            delivery.id,
            study_uid,
            f"{kind} -> {delivery.destination}",
            delivery.attempts,
            delivery_max_attempts,
            delivery.last_error or "",
            delivery.touched_at,
        )
        for delivery, kind, study_uid in db_session.execute(
            select(Delivery, ResultObject.kind, Study.study_uid)
            .join(ResultObject, Delivery.result_id == ResultObject.id)
            .join(Job, ResultObject.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .where(Delivery.state == WorkState.FAILED)
            .order_by(Delivery.id)
        )
    ]
    return failures


def requeue(
    *, db_session: Session, jobs: Sequence[int], deliveries: Sequence[int], actor: str
) -> tuple[list[int], list[int]]:
    """Queue the given failed jobs and deliveries again; return the ids actually re-queued."""
    now = utcnow()
    requeued_jobs = []
    for job in db_session.scalars(
        select(Job).where(Job.id.in_(jobs), Job.state == WorkState.FAILED)
    ):
        job.state = WorkState.QUEUED
        job.attempts = 0
        job.reason = None
        job.queued_at = job.touched_at = now
        job.finished_at = None
        if job.study.analysis_round == job.round:
            job.study.status = StudyStatus.ANALYZING
        add_event(
            db_session=db_session,
            kind="retry",
            study_uid=job.study.study_uid,
            actor=actor,
            job_id=job.id,
        )
        requeued_jobs.append(job.id)
    requeued_deliveries = []
    for delivery in db_session.scalars(
        select(Delivery).where(Delivery.id.in_(deliveries), Delivery.state == WorkState.FAILED)
    ):
        delivery.state = WorkState.QUEUED
        delivery.attempts = 0
        delivery.next_attempt_at = delivery.touched_at = now
        add_event(
            db_session=db_session,
            kind="retry",
            study_uid=delivery.result.job.study.study_uid,
            actor=actor,
            delivery_id=delivery.id,
        )
        requeued_deliveries.append(delivery.id)
    return requeued_jobs, requeued_deliveries
