"""One job per (study, model, model version); a re-analysis re-queues the same row."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.catalog import ModelDescription
from triage.db.base import utcnow
from triage.db.models import Job, Study
from triage.domain import StudyStatus, WorkState


def queue_jobs(
    *, db_session: Session, study: Study, models: Iterable[ModelDescription]
) -> list[int]:
    """Queue each model on ``study`` for its current analysis round; return the job ids.

    The caller sends the ids to the broker after the commit.
    """
    now = utcnow()
    job_ids = []
    for model in models:
        job = db_session.scalar(
            select(Job).where(
                Job.study_id == study.id,
                Job.model_name == model.name,
                Job.model_version == model.version,
            )
        )
        if job is None:
            job = Job(study_id=study.id, model_name=model.name, model_version=model.version)
            db_session.add(job)
        elif job.round != study.analysis_round:
            add_event(
                db_session=db_session,
                kind="job_requeued",
                study_uid=study.study_uid,
                model=model.name,
                version=model.version,
                previous_state=str(job.state),
                round=study.analysis_round,
            )
        job.state = WorkState.QUEUED
        job.round = study.analysis_round
        job.attempts = 0
        job.reason = None
        job.queued_at = job.touched_at = now
        job.started_at = job.finished_at = None
        db_session.flush()
        job_ids.append(job.id)
    if job_ids:
        study.status = StudyStatus.ANALYZING
    return job_ids


def reprocess_study(
    *, db_session: Session, study: Study, models: Iterable[ModelDescription], actor: str
) -> list[int]:
    """Start a new analysis round of ``study`` with ``models``; return the job ids to send."""
    study.analysis_round += 1
    study.status_reason = f"reprocess requested by {actor}"
    models = list(models)
    add_event(
        db_session=db_session,
        kind="reprocess",
        study_uid=study.study_uid,
        actor=actor,
        round=study.analysis_round,
        models=[m.name for m in models],
    )
    return queue_jobs(db_session=db_session, study=study, models=models)
