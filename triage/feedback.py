"""Readers' feedback on the AI's findings: agree, disagree or unsure, per finding, or per
study for a finding the model missed; and the acknowledgment of a critical alert.

Each verdict is kept with the reader, the time, and the model name, version, label, probability
and call of the finding, so that it keeps counting for that model version after a re-run
replaced the finding. A comment is stored as given (and always shown as text).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage import history
from triage.audit import add_event
from triage.db.base import utcnow
from triage.db.models import Feedback, Finding, Job, Study, WorklistEntry
from triage.domain import ModelMode, Verdict

MAX_COMMENT_CHARS = 2000


class FeedbackError(ValueError):
    """Feedback that cannot be taken; the message says why."""


class UnknownStudy(FeedbackError):
    pass


@dataclass(frozen=True)
class FeedbackInput:
    finding: int | None
    verdict: Verdict
    comment: str | None
    reader: str


def add_feedback(db_session: Session, *, study_uid: str, given: FeedbackInput) -> Feedback:
    """Store one verdict; raises UnknownStudy, or FeedbackError for a finding of another study
    or a comment that is too long."""
    study = db_session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise UnknownStudy(f"no study {study_uid}")
    comment = (given.comment or "").strip() or None
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise FeedbackError(f"the comment is longer than {MAX_COMMENT_CHARS} characters")
    row = Feedback(
        study_id=study.id,
        verdict=given.verdict,
        comment=comment,
        reader=given.reader,
        at=utcnow(),
    )
    if given.finding is not None:
        found = db_session.execute(
            select(Finding, Job)
            .join(Job, Finding.job_id == Job.id)
            .where(Finding.id == given.finding, Job.study_id == study.id)
        ).first()
        if found is None:
            raise FeedbackError(f"study {study_uid} has no finding {given.finding}")
        finding, job = found
        row.finding_id = finding.id
        row.model_name, row.model_version = job.model_name, job.model_version
        row.label, row.probability, row.positive = (
            finding.label,
            finding.probability,
            finding.positive,
        )
    else:  # on the study: it counts for the model versions that ran on it
        jobs = db_session.scalars(
            select(Job)
            .where(
                Job.study_id == study.id,
                Job.round == study.analysis_round,
                Job.mode != ModelMode.SHADOW,
            )
            .order_by(Job.id)
        ).all()
        if len(jobs) == 1:
            row.model_name, row.model_version = jobs[0].model_name, jobs[0].model_version
    db_session.add(row)
    db_session.flush()
    return row


@dataclass(frozen=True)
class FeedbackRow:
    """A verdict as exported: the stored row with its study's UID."""

    id: int
    at: datetime
    study_uid: str
    finding_id: int | None
    model_name: str | None
    model_version: str | None
    label: str | None
    probability: float | None
    positive: bool | None
    verdict: Verdict
    comment: str | None
    reader: str


def list_feedback(db_session: Session, *, since: datetime | None = None) -> list[FeedbackRow]:
    """Every verdict, oldest first; from ``since`` on where given."""
    query = (
        select(Feedback, Study.study_uid)
        .join(Study, Study.id == Feedback.study_id)
        .order_by(Feedback.at, Feedback.id)
    )
    if since is not None:
        query = query.where(Feedback.at >= since)
    return [
        FeedbackRow(
            id=row.id,
            at=row.at,
            study_uid=study_uid,
            finding_id=row.finding_id,
            model_name=row.model_name,
            model_version=row.model_version,
            label=row.label,
            probability=row.probability,
            positive=row.positive,
            verdict=row.verdict,
            comment=row.comment,
            reader=row.reader,
        )
        for row, study_uid in db_session.execute(query)
    ]


def acknowledge(db_session: Session, *, study_uid: str, reader: str) -> WorklistEntry:
    """A reader has seen the study's critical alert: it is not escalated. Recorded in the
    priority history and the audit log."""
    study = db_session.scalar(select(Study).where(Study.study_uid == study_uid))
    entry = (
        db_session.scalar(select(WorklistEntry).where(WorklistEntry.study_id == study.id))
        if study
        else None
    )
    if study is None or entry is None:
        raise UnknownStudy(f"study {study_uid} is not on the worklist")
    now = utcnow()
    entry.acknowledged_at, entry.acknowledged_by = now, reader
    entry.updated_at = now
    history.note(db_session, entry, at=now, reason=f"critical alert acknowledged by {reader}")
    add_event(db_session=db_session, kind="alert_acknowledged", study_uid=study_uid, actor=reader)
    return entry
