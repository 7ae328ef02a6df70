"""Reading the worklist and a study's whole record, for the API, the page and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.db.models import (
    Delivery,
    Job,
    PriorityChange,
    ResultObject,
    Series,
    Study,
    WorklistEntry,
)
from triage.domain import ReadingState, StudyStatus, Tier
from triage.worklist.records import (
    DeliveryRecord,
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
        )


def worklist(
    *,
    db_session: Session,
    tier: Tier | None = None,
    states: tuple[ReadingState, ...] = (ReadingState.UNREAD, ReadingState.CLAIMED),
    modality: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[WorklistItem]:
    """Most urgent first: tier, then score (share of target used), arrival, Study UID."""
    query = (
        select(WorklistEntry, Study)
        .join(Study, WorklistEntry.study_id == Study.id)
        .where(WorklistEntry.reading_state.in_(states))
        .order_by(
            WorklistEntry.tier_rank,
            WorklistEntry.score.desc(),
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
        )
        for entry, study in db_session.execute(query)
    ]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def study_record(*, db_session: Session, study_uid: str) -> StudyRecord | None:
    """Everything known about one study: status, series, jobs, findings, results, deliveries,
    worklist entry and priority history."""
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
        jobs=jobs_section(db_session, study),
        results=results_section(db_session, study),
        deliveries=deliveries_section(db_session, study),
        worklist=worklist_section(db_session, study),
        priority_history=history_section(db_session, study),
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


def jobs_section(db_session: Session, study: Study) -> list[JobRecord]:
    jobs = db_session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
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
            findings=[
                FindingRecord(
                    kind=f.kind,
                    label=f.label,
                    code=f"{f.code_scheme}:{f.code_value}",
                    meaning=f.code_meaning,
                    probability=f.probability,
                    positive=f.positive,
                    volume_ml=f.volume_ml,
                    location=f.location,
                )
                for f in j.findings
            ],
        )
        for j in jobs
    ]


def results_section(db_session: Session, study: Study) -> list[ResultRecord]:
    results = db_session.scalars(
        select(ResultObject).join(Job).where(Job.study_id == study.id).order_by(ResultObject.id)
    ).all()
    return [
        ResultRecord(
            kind=r.kind, sop_instance_uid=r.sop_instance_uid, series_uid=r.series_uid, round=r.round
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
