"""Reading the worklist and a study's whole record, for the API, the page and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage.db.models import (
    Delivery,
    Feedback,
    Finding,
    Job,
    Notification,
    PriorityChange,
    ResultObject,
    Series,
    Study,
    WorklistEntry,
)
from triage.domain import ModelMode, ReadingState, StudyStatus, Tier, WorkState
from triage.notify import registered_channels
from triage.review import HELD, is_held
from triage.worklist.records import (
    DeliveryRecord,
    FeedbackRecord,
    FindingRecord,
    JobRecord,
    PriorityChangeRecord,
    ResultRecord,
    SeriesRecord,
    StudyRecord,
    WorklistPosition,
    WorklistRow,
)


@dataclass(frozen=True)
class WorklistItem:
    study_uid: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_description: str | None
    modalities: str | None
    status: StudyStatus
    tier: Tier
    score: float
    reason: str
    received_at: datetime
    due_at: datetime | None
    reading_state: ReadingState
    claimed_by: str | None
    claim_expires_at: datetime | None
    has_key_image: bool = False
    needs_acknowledgment: bool = False
    acknowledged_by: str | None = None
    awaiting_approval: bool = False

    def row(self, *, now: datetime, viewer_url_template: str = "") -> WorklistRow:
        """The item as the page lists it at ``now``: waiting and due times, viewer link."""
        return WorklistRow(
            study_uid=self.study_uid,
            patient_name=self.patient_name,
            patient_id=self.patient_id,
            accession_number=self.accession_number,
            study_description=self.study_description,
            modalities=self.modalities,
            status=self.status,
            tier=self.tier,
            score=self.score,
            reason=self.reason,
            received_at=self.received_at.isoformat(),
            due_at=_iso(self.due_at),
            reading_state=self.reading_state,
            claimed_by=self.claimed_by,
            claim_expires_at=_iso(self.claim_expires_at),
            waited_seconds=max(0.0, (now - self.received_at).total_seconds()),
            due_in_seconds=(self.due_at - now).total_seconds() if self.due_at else None,
            viewer_url=(
                viewer_url_template.replace("{study_uid}", self.study_uid)
                if viewer_url_template
                else None
            ),
            key_image_url=key_image_url(self.study_uid) if self.has_key_image else None,
            needs_acknowledgment=self.needs_acknowledgment,
            acknowledged_by=self.acknowledged_by,
            awaiting_approval=self.awaiting_approval,
        )


def key_image_url(study_uid: str, finding_id: int | None = None) -> str:
    url = f"/api/studies/{study_uid}/key-image"
    return url if finding_id is None else f"{url}?finding={finding_id}"


def key_image_findings(
    db_session: Session, study: Study, *, include_shadow: bool = False
) -> list[Finding]:
    """The study's findings with a key image, from its current round, most significant first:
    the highest probability, then the largest volume."""
    query = (
        select(Finding)
        .join(Job, Finding.job_id == Job.id)
        .where(
            Job.study_id == study.id,
            Job.round == study.analysis_round,
            Finding.key_image_ref.is_not(None),
        )
        .order_by(Finding.probability.desc(), Finding.volume_ml.desc(), Finding.id)
    )
    if not include_shadow:
        query = query.where(Job.mode != ModelMode.SHADOW)
    return list(db_session.scalars(query))


def _page_facts(
    db_session: Session, rows: list[tuple[WorklistEntry, Study]]
) -> tuple[set[int], set[int], dict[int, datetime]]:
    """For a page of studies: those with a key image, those with a run awaiting approval, and
    when each was last alerted."""
    ids = [study.id for _, study in rows]
    if not ids:
        return set(), set(), {}
    current = (Job.study_id.in_(ids), Job.round == Study.analysis_round)
    with_images = set(
        db_session.scalars(
            select(Job.study_id)
            .join(Study, Study.id == Job.study_id)
            .join(Finding, Finding.job_id == Job.id)
            .where(*current, Job.mode != ModelMode.SHADOW, Finding.key_image_ref.is_not(None))
            .distinct()
        )
    )
    held = set(
        db_session.scalars(
            select(Job.study_id)
            .join(Study, Study.id == Job.study_id)
            .where(*current, *HELD)
            .distinct()
        )
    )
    alerted: dict[int, datetime] = {
        study_id: at
        for study_id, at in db_session.execute(
            select(Notification.study_id, func.max(Notification.created_at))
            .where(
                Notification.study_id.in_(ids),
                Notification.channel.in_(tuple(registered_channels())),
            )
            .group_by(Notification.study_id)
        )
    }
    return with_images, held, alerted


def needs_acknowledgment(entry: WorklistEntry, alerted_at: datetime | None) -> bool:
    """A critical alert went out and nobody acknowledged the study since."""
    if alerted_at is None or entry.tier != Tier.CRITICAL:
        return False
    return entry.acknowledged_at is None or entry.acknowledged_at < alerted_at


def worklist(
    *,
    db_session: Session,
    tier: Tier | None = None,
    states: tuple[ReadingState, ...] = (ReadingState.UNREAD, ReadingState.CLAIMED),
    modality: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[WorklistItem]:
    """Most urgent first: tier, then score (share of target used), severity, arrival, Study UID."""
    query = (
        select(WorklistEntry, Study)
        .join(Study, WorklistEntry.study_id == Study.id)
        .where(WorklistEntry.reading_state.in_(states))
        .order_by(
            WorklistEntry.tier_rank,
            WorklistEntry.score.desc(),
            WorklistEntry.severity_probability.desc(),
            WorklistEntry.severity_volume.desc(),
            Study.first_received_at,
            Study.study_uid,
        )
        .limit(limit)
        .offset(offset)
    )
    if tier is not None:
        query = query.where(WorklistEntry.tier == tier)
    if modality:
        query = query.where(Study.modalities.contains(modality.upper()))
    rows = [(entry, study) for entry, study in db_session.execute(query)]
    with_images, held, alerted = _page_facts(db_session, rows)
    return [
        WorklistItem(
            study_uid=study.study_uid,
            patient_name=study.patient_name,
            patient_id=study.patient_id,
            accession_number=study.accession_number,
            study_description=study.study_description,
            modalities=study.modalities,
            status=study.status,
            tier=entry.tier,
            score=round(entry.score, 4),
            reason=entry.reason,
            received_at=study.first_received_at,
            due_at=entry.due_at,
            reading_state=entry.reading_state,
            claimed_by=entry.claimed_by,
            claim_expires_at=entry.claim_expires_at,
            has_key_image=study.id in with_images,
            needs_acknowledgment=needs_acknowledgment(entry, alerted.get(study.id)),
            acknowledged_by=entry.acknowledged_by,
            awaiting_approval=study.id in held,
        )
        for entry, study in rows
    ]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def study_record(
    *,
    db_session: Session,
    study_uid: str,
    include_shadow: bool = True,
    viewer_url_template: str = "",
) -> StudyRecord | None:
    """Everything known about one study: status, series, jobs, findings, results, deliveries,
    worklist entry, priority history and feedback. Runs made in shadow mode are left out unless
    ``include_shadow`` (administrators see them)."""
    study = db_session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return None
    return StudyRecord(
        study_uid=study.study_uid,
        status=study.status,
        status_reason=study.status_reason,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        study_description=study.study_description,
        modalities=study.modalities,
        order_priority=study.order_priority,
        analysis_round=study.analysis_round,
        received_at=study.first_received_at.isoformat(),
        completed_at=_iso(study.completed_at),
        series=series_section(db_session, study),
        jobs=jobs_section(db_session, study, include_shadow=include_shadow),
        results=results_section(db_session, study),
        deliveries=deliveries_section(db_session, study),
        worklist=worklist_section(db_session, study),
        priority_history=history_section(db_session, study),
        feedback=feedback_section(db_session, study),
        viewer_url=(
            viewer_url_template.replace("{study_uid}", study.study_uid)
            if viewer_url_template
            else None
        ),
    )


def series_section(db_session: Session, study: Study) -> list[SeriesRecord]:
    series = db_session.scalars(select(Series).where(Series.study_id == study.id)).all()
    return [
        SeriesRecord(
            series_uid=s.series_uid,
            modality=s.modality,
            description=s.series_description,
            instances=len(s.instances),
        )
        for s in series
    ]


def jobs_section(
    db_session: Session, study: Study, *, include_shadow: bool = True
) -> list[JobRecord]:
    query = select(Job).where(Job.study_id == study.id).order_by(Job.id)
    if not include_shadow:
        query = query.where(Job.mode != ModelMode.SHADOW)
    jobs = db_session.scalars(query).all()
    return [
        JobRecord(
            id=j.id,
            model=j.model_name,
            version=j.model_version,
            state=j.state,
            round=j.round,
            attempts=j.attempts,
            reason=j.reason,
            series_uid=j.series_uid,
            timings=j.timings,
            mode=j.mode,
            held=is_held(j),
            approved_at=_iso(j.approved_at),
            approved_by=j.approved_by,
            findings=[
                FindingRecord(
                    id=f.id,
                    kind=f.kind,
                    label=f.label,
                    code=f"{f.code_scheme}:{f.code_value}",
                    meaning=f.code_meaning,
                    probability=f.probability,
                    positive=f.positive,
                    volume_ml=f.volume_ml,
                    location=f.location,
                    key_image_url=(
                        key_image_url(study.study_uid, f.id)
                        if f.key_image_ref and j.round == study.analysis_round
                        else None
                    ),
                )
                for f in j.findings
            ],
            queued_at=j.queued_at.isoformat(),
            started_at=_iso(j.started_at),
            finished_at=_iso(j.finished_at),
        )
        for j in jobs
    ]


def results_section(db_session: Session, study: Study) -> list[ResultRecord]:
    results = db_session.scalars(
        select(ResultObject).join(Job).where(Job.study_id == study.id).order_by(ResultObject.id)
    ).all()
    return [
        ResultRecord(
            kind=r.kind,
            sop_instance_uid=r.sop_instance_uid,
            series_uid=r.series_uid,
            round=r.round,
            retracted_at=_iso(r.retracted_at),
        )
        for r in results
    ]


def deliveries_section(db_session: Session, study: Study) -> list[DeliveryRecord]:
    deliveries = db_session.scalars(
        select(Delivery)
        .join(ResultObject)
        .join(Job)
        .where(Job.study_id == study.id)
        .order_by(Delivery.id)
    ).all()
    return [
        DeliveryRecord(
            id=d.id,
            result=d.result.kind,
            destination=d.destination,
            state=d.state,
            attempts=d.attempts,
            last_error=d.last_error,
            delivered_at=_iso(d.delivered_at),
            result_uid=d.result.sop_instance_uid,
            next_attempt_at=_iso(d.next_attempt_at) if d.state == WorkState.QUEUED else None,
        )
        for d in deliveries
    ]


def worklist_section(db_session: Session, study: Study) -> WorklistPosition | None:
    entry = db_session.scalar(select(WorklistEntry).where(WorklistEntry.study_id == study.id))
    if entry is None:
        return None
    return WorklistPosition(
        tier=entry.tier,
        score=entry.score,
        reason=entry.reason,
        due_at=_iso(entry.due_at),
        reading_state=entry.reading_state,
        claimed_by=entry.claimed_by,
        acknowledged_at=_iso(entry.acknowledged_at),
        acknowledged_by=entry.acknowledged_by,
    )


def history_section(db_session: Session, study: Study) -> list[PriorityChangeRecord]:
    history = db_session.scalars(
        select(PriorityChange)
        .where(PriorityChange.study_id == study.id)
        .order_by(PriorityChange.changed_at, PriorityChange.id)
    ).all()
    return [
        PriorityChangeRecord(
            at=h.changed_at.isoformat(),
            old_tier=h.old_tier,
            new_tier=h.new_tier,
            old_score=h.old_score,
            new_score=h.new_score,
            reason=h.reason,
        )
        for h in history
    ]


def feedback_section(db_session: Session, study: Study) -> list[FeedbackRecord]:
    rows = db_session.scalars(
        select(Feedback).where(Feedback.study_id == study.id).order_by(Feedback.at, Feedback.id)
    ).all()
    return [feedback_record(row) for row in rows]


def feedback_record(row: Feedback) -> FeedbackRecord:
    return FeedbackRecord(
        id=row.id,
        finding=row.finding_id,
        model=row.model_name,
        version=row.model_version,
        label=row.label,
        probability=row.probability,
        positive=row.positive,
        verdict=row.verdict,
        comment=row.comment,
        reader=row.reader,
        at=row.at.isoformat(),
    )
