"""The worklist service on both databases: ranking on events, aging on the clock, history."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Finding, Job, Notification, PriorityChange, Study, WorklistEntry
from triage.db.session import SessionFactory, session_scope
from triage.domain import ReadingState, StudyStatus, Tier, WorkState
from triage.worklist.policy import PolicyConfig
from triage.worklist.service import WorklistClock, reprioritize


def _study(session_factory: SessionFactory, uid: str, received_hours_ago: float) -> None:
    received = utcnow() - timedelta(hours=received_hours_ago)
    with session_scope(session_factory) as session:
        study = Study(
            study_uid=uid,
            status=StudyStatus.ANALYZED,
            modalities="CT",
            analysis_round=1,
            first_received_at=received,
            last_received_at=received,
        )
        session.add(study)
        session.flush()
        reprioritize(
            db_session=session, study=study, now=received, config=PolicyConfig(), models={}
        )


def test_waiting_studies_escalate_on_the_clock(
    session_factory: SessionFactory, settings: Settings
) -> None:
    _study(session_factory, "1.9.1", received_hours_ago=25)  # past the 24 h routine target
    _study(session_factory, "1.9.2", received_hours_ago=1)
    changed = WorklistClock(settings, session_factory).tick()
    assert changed == 1  # both re-scored; the change worth recording is the escalation
    with session_scope(session_factory) as session:
        tiers = dict(
            session.execute(select(Study.study_uid, WorklistEntry.tier).join(WorklistEntry)).all()
        )
        assert tiers == {"1.9.1": Tier.URGENT, "1.9.2": Tier.ROUTINE}
        history = session.scalars(
            select(PriorityChange).join(Study).where(Study.study_uid == "1.9.1")
            .order_by(PriorityChange.id)
        ).all()  # fmt: skip
        assert [h.new_tier for h in history] == [Tier.ROUTINE, Tier.URGENT]
        assert history[-1].old_tier == Tier.ROUTINE
        assert "past routine target" in history[-1].reason
    assert WorklistClock(settings, session_factory).tick() == 0  # nothing new to record


def test_claims_lapse(session_factory: SessionFactory, settings: Settings) -> None:
    _study(session_factory, "1.9.3", received_hours_ago=0.1)
    with session_scope(session_factory) as session:
        entry = session.scalars(select(WorklistEntry)).one()
        entry.reading_state = ReadingState.CLAIMED
        entry.claimed_by = "dr.a"
        entry.claim_expires_at = utcnow() - timedelta(minutes=1)
    WorklistClock(settings, session_factory).tick()
    with session_scope(session_factory) as session:
        entry = session.scalars(select(WorklistEntry)).one()
        assert (entry.reading_state, entry.claimed_by) == (ReadingState.UNREAD, None)


def test_one_notification_per_channel_per_critical_finding(
    session_factory: SessionFactory,
) -> None:
    _study(session_factory, "1.9.4", received_hours_ago=0)
    with session_scope(session_factory) as session:
        study = session.scalars(select(Study)).one()
        job = Job(study_id=study.id, model_name="ich", model_version="1", state=WorkState.DONE)
        session.add(job)
        session.flush()
        session.add(
            Finding(
                job_id=job.id, ordinal=0, kind="score", label="ich", code_scheme="SCT",
                code_value="1386000", code_meaning="Intracranial hemorrhage", probability=0.95,
                positive=True,
            )
        )  # fmt: skip
        session.flush()
        for minutes in (0, 5, 60):
            reprioritize(
                db_session=session,
                study=study,
                now=utcnow() + timedelta(minutes=minutes),
                config=PolicyConfig(),
                models={},
            )
        entry = session.scalars(select(WorklistEntry)).one()
        assert entry.tier == Tier.CRITICAL
        channels = session.scalars(select(Notification.channel).order_by(Notification.channel))
        assert list(channels) == ["hl7", "webhook"]
