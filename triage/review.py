"""Runs held for review (``review`` mode, see ``triage.modes``): approving one sends its result
objects to every destination and lets its critical alerts go, once.

The objects of a held run are built and kept like any other, but no delivery is queued for them;
an approval queues them (the same rows a clinical run gets), records who approved and when, and
re-ranks the study so that the alerts the run's findings owe are created. Approving again finds
nothing held and does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.db.base import utcnow
from triage.db.models import Delivery, Job, ResultObject, Study
from triage.domain import ModelMode, WorkState


def queue_deliveries(
    db_session: Session, result: ResultObject, targets: Iterable[str], now: datetime
) -> list[int]:
    """One delivery of ``result`` per destination, queued afresh; returns their ids."""
    existing = {d.destination: d for d in result.deliveries}
    ids = []
    for name in targets:
        delivery = existing.get(name)
        if delivery is None:
            delivery = Delivery(result_id=result.id, destination=name)
            db_session.add(delivery)
        delivery.state = WorkState.QUEUED
        delivery.attempts = 0
        delivery.last_error = None
        delivery.delivered_at = None
        delivery.next_attempt_at = delivery.touched_at = now
        db_session.flush()
        ids.append(delivery.id)
    return ids


def is_held(job: Job) -> bool:
    """Whether the finished job's results and alerts wait for an approval."""
    return job.state == WorkState.DONE and job.mode == ModelMode.REVIEW and not job.approved_at


HELD: tuple[ColumnElement[bool], ...] = (
    Job.state == WorkState.DONE,
    Job.mode == ModelMode.REVIEW,
    Job.approved_at.is_(None),
)
"""``is_held`` as query conditions."""


def held_jobs(db_session: Session, study: Study) -> list[Job]:
    """The study's finished runs of its current round that wait for an approval."""
    return list(
        db_session.scalars(
            select(Job)
            .where(Job.study_id == study.id, Job.round == study.analysis_round, *HELD)
            .order_by(Job.id)
        )
    )


@dataclass(frozen=True)
class Approval:
    jobs: list[int] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)


def approve(db_session: Session, *, study: Study, targets: Iterable[str], actor: str) -> Approval:
    """Approve every held run of the study: queue its objects' deliveries (send them after the
    commit) and record the approval. The caller re-ranks the study, which owes the alerts."""
    jobs = held_jobs(db_session, study)
    now = utcnow()
    names = list(targets)
    deliveries: list[int] = []
    for job in jobs:
        job.approved_at, job.approved_by = now, actor
        results = db_session.scalars(
            select(ResultObject).where(
                ResultObject.job_id == job.id, ResultObject.retracted_at.is_(None)
            )
        )
        for result in results:
            deliveries += queue_deliveries(db_session, result, names, now)
        add_event(
            db_session=db_session,
            kind="results_approved",
            study_uid=study.study_uid,
            actor=actor,
            job_id=job.id,
            model=job.model_name,
            version=job.model_version,
        )
    return Approval(jobs=[job.id for job in jobs], deliveries=deliveries)
