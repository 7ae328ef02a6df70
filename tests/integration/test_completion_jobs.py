"""Completion -> routing -> one job per model, sent to the broker by task name."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from tests.conftest import StackFactory
from tests.helpers.instances import ct_study
from triage.broker import TaskSender, broker_url, queue_depths
from triage.catalog import ModelDescription
from triage.config import RoutingRule, Settings
from triage.db.base import utcnow
from triage.db.models import AuditEvent, Job, Study
from triage.db.session import session_scope
from triage.domain import StudyStatus, WorkState
from triage.ingest.completion import StudyCompletionWatcher
from triage.ingest.sweeper import Sweeper

MODEL = ModelDescription(name="ct-head-hyperdensity", version="1.0.0", format="torchscript")


def test_completed_studies_get_jobs_on_the_broker(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings = settings.model_copy(
        update={
            "routing_rules": [
                RoutingRule(name="head", models=["ct-head-hyperdensity"], body_part="HEAD"),
                RoutingRule(name="knee", models=["knee-model"], body_part="KNEE"),
            ]
        }
    )
    stack = stack_factory(settings)
    factory = stack.session_factory
    sender = TaskSender(settings)
    watcher = StudyCompletionWatcher(
        settings, factory, catalog=lambda: {MODEL.name: MODEL}, send_job=sender.analyze_study
    )

    head = ct_study(tmp_path / "head", 3)
    stack.ingest(*head.paths)
    assert watcher.poll() == []  # quiet period (5 s) not over, association not released
    watcher.association_ended({head.study_uid})
    later = utcnow().replace(microsecond=0)
    assert watcher.poll(now=later.replace(year=later.year + 1)) == [head.study_uid]

    with session_scope(factory) as session:
        study = session.scalars(select(Study)).one()
        job = session.scalars(select(Job)).one()
        assert study.status == StudyStatus.ANALYZING
        assert (job.model_name, job.model_version, job.state, job.round) == (
            MODEL.name,
            MODEL.version,
            WorkState.QUEUED,
            1,
        )
        first_job_id = job.id
    assert queue_depths(broker_url(settings))["inference"] == 1

    # A late instance re-opens the study; the same job row is queued again for round 2.
    stack.ingest(*ct_study(tmp_path / "late", 1, study_uid=head.study_uid).paths)
    watcher.poll(now=later.replace(year=later.year + 2))
    with session_scope(factory) as session:
        job = session.scalars(select(Job)).one()
        assert (job.id, job.round, job.state) == (first_job_id, 2, WorkState.QUEUED)
        kinds = session.scalars(select(AuditEvent.kind).order_by(AuditEvent.id)).all()
        assert kinds == ["study_complete", "study_reopened", "study_complete", "job_requeued"]
    assert queue_depths(broker_url(settings))["inference"] == 2
    sender.close()


def test_no_rule_and_missing_model(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings = settings.model_copy(
        update={
            "routing_rules": [RoutingRule(name="knee", models=["knee-model"], body_part="HEAD")]
        }
    )
    stack = stack_factory(settings)
    factory = stack.session_factory
    sent = ct_study(tmp_path / "a", 1)
    stack.ingest(*sent.paths)
    watcher = StudyCompletionWatcher(settings, factory, catalog=dict)
    far = utcnow().replace(year=utcnow().year + 1)
    assert watcher.poll(now=far) == [sent.study_uid]
    with session_scope(factory) as session:
        study = session.scalars(select(Study)).one()
        assert study.status == StudyStatus.FAILED
        assert study.status_reason == "model not installed: knee-model"

    other = settings.model_copy(update={"routing_rules": []})
    stack.ingest(*ct_study(tmp_path / "b", 1).paths)
    StudyCompletionWatcher(other, factory, catalog=dict).poll(now=far)
    with session_scope(factory) as session:
        statuses = sorted(str(s.status) for s in session.scalars(select(Study)))
        assert statuses == ["analyzed", "failed"]


def test_sweeper_resends_jobs_the_broker_lost(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    stack = stack_factory(settings)
    stack.ingest(*ct_study(tmp_path / "head", 2).paths)
    watcher = StudyCompletionWatcher(
        settings, stack.session_factory, catalog=lambda: {MODEL.name: MODEL}
    )
    start = utcnow()
    watcher.poll(now=start + timedelta(days=1))  # queued, but never sent: a lost message
    sender = TaskSender(settings)
    sweeper = Sweeper(settings, stack.session_factory, sender.analyze_study)
    assert sweeper.sweep(now=utcnow()) == []  # not overdue yet
    overdue = utcnow() + timedelta(seconds=settings.job_resend_seconds + 1)
    (job_id,) = sweeper.sweep(now=overdue)
    assert queue_depths(broker_url(settings))["inference"] == 1
    assert sweeper.sweep(now=overdue) == []  # touched again: not re-sent twice

    # A worker died while running it: re-sent after the job timeout, as queued.
    with session_scope(stack.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = WorkState.RUNNING
        job.touched_at = overdue
    late = overdue + timedelta(seconds=settings.job_timeout_seconds + 1)
    assert sweeper.sweep(now=late) == [job_id]
    with session_scope(stack.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.state == WorkState.QUEUED
        resent = session.scalars(select(AuditEvent).where(AuditEvent.kind == "job_resent")).all()
        assert [e.detail["previous_state"] for e in resent] == ["queued", "running"]
    assert queue_depths(broker_url(settings))["inference"] == 2
    sender.close()


def test_expected_instance_count_completes_at_once(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    """A sender that says how many instances the study has needs no quiet period."""
    settings = settings.model_copy(update={"routing_rules": []})
    stack = stack_factory(settings)
    sent = ct_study(tmp_path / "a", 3)
    for path in sent.paths:
        ds = dcmread(path)
        ds.NumberOfStudyRelatedInstances = 3
        ds.save_as(path)
    watcher = StudyCompletionWatcher(settings, stack.session_factory, catalog=dict)
    stack.ingest(*sent.paths[:2])
    assert watcher.poll() == []
    stack.ingest(sent.paths[2])
    assert watcher.poll() == [sent.study_uid]
    with session_scope(stack.session_factory) as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.kind == "study_complete")).one()
        assert event.detail["reason"] == "expected instance count reached"


def test_the_watcher_wakes_when_a_released_study_is_due(
    settings: Settings, stack_factory: StackFactory
) -> None:
    """Polls every 0.25 s, but a study released with a 1 s grace is looked at when its grace
    ends, not up to a poll later; one already due waits for the ordinary poll."""
    settings = settings.model_copy(update={"association_grace_seconds": 1.0})
    watcher = StudyCompletionWatcher(settings, stack_factory(settings).session_factory)
    assert watcher.next_wait() == 0.25
    watcher.association_ended({"1.2.3"})
    released = utcnow()
    assert watcher.next_wait(now=released + timedelta(seconds=0.9)) == pytest.approx(0.1, abs=0.02)
    assert watcher.next_wait(now=released + timedelta(seconds=0.5)) == 0.25
    assert watcher.next_wait(now=released + timedelta(seconds=2)) == 0.25
