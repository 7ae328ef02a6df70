"""Applies the priority policy to stored studies: worklist entries, their history, and the
outward notifications a critical finding owes. The policy itself is pure (policy.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.catalog import ModelDescription, usable_models
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Finding, Job, PriorityChange, Study, WorklistEntry
from triage.db.session import SessionFactory, session_scope
from triage.domain import ModelMode, ReadingState, StudyStatus, WorkState
from triage.notify import owe, registered_channels
from triage.review import held_jobs
from triage.worklist.policy import (
    AnalysisState,
    FindingSignal,
    PolicyConfig,
    Priority,
    StudySignals,
    Turnaround,
    compute_priority,
    describe_change,
    tier_rank,
)

log = logging.getLogger(__name__)

_ANALYSIS = {
    StudyStatus.ANALYZED: AnalysisState.ANALYZED,
    StudyStatus.FAILED: AnalysisState.FAILED,
}


def _finding_signals(
    db_session: Session, study: Study, models: Mapping[str, ModelDescription]
) -> list[FindingSignal]:
    """One signal per model run of the current round: its study-level score, with the total
    volume of its lesions. Runs in shadow mode change nothing and give none."""
    rows = db_session.execute(
        select(Job, Finding)
        .join(Finding, Finding.job_id == Job.id)
        .where(
            Job.study_id == study.id,
            Job.round == study.analysis_round,
            Job.state == WorkState.DONE,
            Job.mode != ModelMode.SHADOW,
        )
        .order_by(Job.id, Finding.ordinal)
    )
    by_job: dict[int, tuple[Job, list[Finding]]] = {}
    for job, finding in rows:
        by_job.setdefault(job.id, (job, []))[1].append(finding)
    signals = []
    for job, findings in by_job.values():
        description = models.get(job.model_name)
        operating_point = description.operating_point if description else {}
        threshold = float(
            operating_point.get("study_probability_threshold")
            or operating_point.get("probability_threshold")
            or 0.5
        )
        critical = (
            bool((description.model_extra or {}).get("critical", True)) if description else True
        )
        lesions = [f.volume_ml for f in findings if f.kind == "lesion" and f.volume_ml]
        for score in (f for f in findings if f.kind == "score"):
            signals.append(
                FindingSignal(
                    model=job.model_name,
                    label=score.code_meaning,
                    probability=score.probability,
                    positive=score.positive,
                    threshold=min(threshold, 1.0),
                    critical=critical,
                    volume_ml=sum(lesions) if lesions and score.positive else None,
                )
            )
    return signals


def signals_for(
    db_session: Session, study: Study, models: Mapping[str, ModelDescription]
) -> StudySignals:
    signals = partial(
        StudySignals,
        study_uid=study.study_uid,
        received_at=study.first_received_at,
        modalities=study.modalities or "",
        findings=_finding_signals(db_session, study, models),
        analysis=_ANALYSIS.get(study.status, AnalysisState.PENDING),
    )
    try:
        return signals(order_priority=study.order_priority)
    except ValueError:  # an order priority outside the defined terms counts as none
        log.warning("unknown order priority ignored", extra={"study_uid": study.study_uid})
        return signals(order_priority=None)


def policy_config(settings: Settings) -> PolicyConfig:
    return PolicyConfig(
        turnaround=Turnaround(
            critical=timedelta(minutes=settings.critical_target_minutes),
            urgent=timedelta(minutes=settings.urgent_target_minutes),
            routine=timedelta(minutes=settings.routine_target_minutes),
        )
    )


def refresh(*, db_session: Session, study: Study, settings: Settings) -> str | None:
    """Re-rank one study now, with the configured policy and the installed models."""
    return reprioritize(
        db_session=db_session,
        study=study,
        now=utcnow(),
        config=policy_config(settings),
        models=usable_models(settings),
    )


def _current(entry: WorklistEntry | None, study: Study) -> Priority | None:
    if entry is None or entry.due_at is None:
        return None
    return Priority(
        study_uid=study.study_uid,
        received_at=study.first_received_at,
        tier=entry.tier,
        score=entry.score,
        due_at=entry.due_at,
        reason=entry.reason,
    )


def reprioritize(
    *,
    db_session: Session,
    study: Study,
    now: datetime,
    config: PolicyConfig,
    models: Mapping[str, ModelDescription],
) -> str | None:
    """Recompute the study's priority and store it. A meaningful change (tier, reason, due
    time, a quarter of the target) is recorded in the history and returned."""
    signals = signals_for(db_session, study, models)
    new = compute_priority(signals, now=now, config=config)
    entry = db_session.scalar(select(WorklistEntry).where(WorklistEntry.study_id == study.id))
    old = _current(entry, study)
    change = describe_change(old, new)
    if entry is None:
        entry = WorklistEntry(study_id=study.id, reading_state=ReadingState.UNREAD)
        db_session.add(entry)
    if change is not None:
        db_session.add(
            PriorityChange(
                study_id=study.id,
                changed_at=now,
                old_tier=old.tier if old else None,
                new_tier=new.tier,
                old_score=old.score if old else None,
                new_score=new.score,
                reason=change[:500],
            )
        )
        entry.updated_at = now  # the page refreshes on this
    # The score ages continuously; it is stored on every pass so the order stays current.
    entry.tier, entry.tier_rank, entry.score = new.tier, tier_rank(new.tier), new.score
    entry.due_at, entry.reason = new.due_at, new.reason
    entry.severity_probability, entry.severity_volume = new.severity
    held = {job.model_name for job in held_jobs(db_session, study)}
    for finding in signals.findings:
        if finding.flags_critical and finding.model not in held:  # held: alerts wait (review)
            _owe_notifications(db_session, study, finding, new, now)
    return change


def _owe_notifications(
    db_session: Session, study: Study, finding: FindingSignal, priority: Priority, now: datetime
) -> None:
    """One message per channel per critical finding and analysis round, never more."""
    payload = {
        "study_uid": study.study_uid,
        "accession_number": study.accession_number,
        "model": finding.model,
        "finding": finding.label,
        "probability": round(finding.probability, 4),
        "volume_ml": round(finding.volume_ml, 2) if finding.volume_ml else None,
        "tier": str(priority.tier),
        "reason": priority.reason,
        "round": study.analysis_round,
    }
    for channel in registered_channels():  # every channel module registered
        owe(
            db_session,
            channel=channel,
            study_id=study.id,
            dedup_key=f"{channel}:{study.study_uid}:{finding.model}:{study.analysis_round}",
            payload=payload,
            now=now,
        )


def expire_claims(*, db_session: Session, now: datetime) -> int:
    """Claims past their expiry return to unread."""
    expired = db_session.scalars(
        select(WorklistEntry).where(
            WorklistEntry.reading_state == ReadingState.CLAIMED,
            WorklistEntry.claim_expires_at < now,
        )
    ).all()
    for entry in expired:
        entry.reading_state = ReadingState.UNREAD
        entry.claimed_by = entry.claimed_at = entry.claim_expires_at = None
        entry.updated_at = now
    return len(expired)


def age_all(
    *,
    db_session: Session,
    now: datetime,
    config: PolicyConfig,
    models: Mapping[str, ModelDescription],
) -> int:
    """The timer: re-rank every study not yet read, so waiting studies escalate."""
    expire_claims(db_session=db_session, now=now)
    studies = db_session.scalars(
        select(Study)
        .join(WorklistEntry, WorklistEntry.study_id == Study.id)
        .where(WorklistEntry.reading_state != ReadingState.READ)
    ).all()
    return sum(
        reprioritize(db_session=db_session, study=s, now=now, config=config, models=models)
        is not None
        for s in studies
    )


class WorklistClock:
    """Re-ranks waiting studies on a timer, so that overdue ones escalate, and lapses claims."""

    POLL_SECONDS = 30.0

    def __init__(self, settings: Settings, session_factory: SessionFactory) -> None:
        self.settings = settings
        self.session_factory = session_factory

    def tick(self, now: datetime | None = None) -> int:
        with session_scope(self.session_factory) as session:
            return age_all(
                db_session=session,
                now=now or utcnow(),
                config=policy_config(self.settings),
                models=usable_models(self.settings),
            )

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.POLL_SECONDS):
            try:
                self.tick()
            except Exception:  # keep the clock running: the next tick retries
                log.exception("worklist aging failed")
