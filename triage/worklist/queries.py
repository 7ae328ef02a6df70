"""Reading the worklist and a study's whole record, for the API, the page and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

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
from triage.domain import ReadingState, Tier


@dataclass(frozen=True)
class WorklistItem:
    study_uid: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_description: str | None
    modalities: str | None
    status: str
    tier: str
    score: float
    reason: str
    received_at: datetime
    due_at: datetime | None
    reading_state: str
    claimed_by: str | None
    claim_expires_at: datetime | None

    def as_json(self, *, now: datetime, viewer_url_template: str = "") -> dict[str, Any]:
        data = asdict(self)
        for key in ("received_at", "due_at", "claim_expires_at"):
            data[key] = data[key].isoformat() if data[key] else None
        data["waited_seconds"] = max(0.0, (now - self.received_at).total_seconds())
        data["due_in_seconds"] = (self.due_at - now).total_seconds() if self.due_at else None
        data["viewer_url"] = (
            viewer_url_template.replace("{study_uid}", self.study_uid)
            if viewer_url_template
            else None
        )
        return data


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
            status=str(study.status),
            tier=str(entry.tier),
            score=round(entry.score, 4),
            reason=entry.reason,
            received_at=study.first_received_at,
            due_at=entry.due_at,
            reading_state=str(entry.reading_state),
            claimed_by=entry.claimed_by,
            claim_expires_at=entry.claim_expires_at,
        )
        for entry, study in db_session.execute(query)
    ]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def study_record(*, db_session: Session, study_uid: str) -> dict[str, Any] | None:
    """Everything known about one study: status, series, jobs, findings, results, deliveries,
    worklist entry and priority history."""
    study = db_session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return None
    entry = db_session.scalar(select(WorklistEntry).where(WorklistEntry.study_id == study.id))
    series = db_session.scalars(select(Series).where(Series.study_id == study.id)).all()
    jobs = db_session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
    history = db_session.scalars(
        select(PriorityChange)
        .where(PriorityChange.study_id == study.id)
        .order_by(PriorityChange.changed_at, PriorityChange.id)
    ).all()
    results = db_session.scalars(
        select(ResultObject).join(Job).where(Job.study_id == study.id).order_by(ResultObject.id)
    ).all()
    deliveries = db_session.scalars(
        select(Delivery)
        .join(ResultObject)
        .join(Job)
        .where(Job.study_id == study.id)
        .order_by(Delivery.id)
    ).all()
    return {
        "study_uid": study.study_uid,
        "status": str(study.status),
        "status_reason": study.status_reason,
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "study_description": study.study_description,
        "modalities": study.modalities,
        "order_priority": study.order_priority,
        "analysis_round": study.analysis_round,
        "received_at": _iso(study.first_received_at),
        "completed_at": _iso(study.completed_at),
        "series": [
            {
                "series_uid": s.series_uid,
                "modality": s.modality,
                "description": s.series_description,
                "instances": len(s.instances),
            }
            for s in series
        ],
        "jobs": [
            {
                "id": j.id,
                "model": j.model_name,
                "version": j.model_version,
                "state": str(j.state),
                "round": j.round,
                "attempts": j.attempts,
                "reason": j.reason,
                "series_uid": j.series_uid,
                "timings": j.timings,
                "findings": [
                    {
                        "kind": f.kind,
                        "label": f.label,
                        "code": f"{f.code_scheme}:{f.code_value}",
                        "meaning": f.code_meaning,
                        "probability": f.probability,
                        "positive": f.positive,
                        "volume_ml": f.volume_ml,
                        "location": f.location,
                    }
                    for f in j.findings
                ],
            }
            for j in jobs
        ],
        "results": [
            {
                "kind": str(r.kind),
                "sop_instance_uid": r.sop_instance_uid,
                "series_uid": r.series_uid,
                "round": r.round,
            }
            for r in results
        ],
        "deliveries": [
            {
                "id": d.id,
                "result": str(d.result.kind),
                "destination": d.destination,
                "state": str(d.state),
                "attempts": d.attempts,
                "last_error": d.last_error,
                "delivered_at": _iso(d.delivered_at),
            }
            for d in deliveries
        ],
        "worklist": None
        if entry is None
        else {
            "tier": str(entry.tier),
            "score": entry.score,
            "reason": entry.reason,
            "due_at": _iso(entry.due_at),
            "reading_state": str(entry.reading_state),
            "claimed_by": entry.claimed_by,
        },
        "priority_history": [
            {
                "at": _iso(h.changed_at),
                "old_tier": str(h.old_tier) if h.old_tier else None,
                "new_tier": str(h.new_tier),
                "old_score": h.old_score,
                "new_score": h.new_score,
                "reason": h.reason,
            }
            for h in history
        ],
    }
