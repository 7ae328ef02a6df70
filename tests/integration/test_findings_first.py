"""Findings first: a job's findings raise the worklist (and owe the critical notifications)
before its SEG and SR exist; a worker lost between the two leaves a job the sweeper sends again,
whose second run builds the objects without taking the study off the worklist."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import select

import workers.analysis
from tests.conftest import IngestStack, StackFactory
from tests.helpers.phantoms import phantom_study
from triage.api.app import create_app
from triage.api.tokens import create_token
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import AuditEvent, Finding, Job, Notification, ResultObject
from triage.db.session import session_scope
from triage.domain import TokenRole, WorkState
from triage.ingest.completion import StudyCompletionWatcher
from triage.ingest.sweeper import Sweeper
from workers.analysis import JobOutcome, analyze, record_job_failure
from workers.context import WorkerContext

pytestmark = pytest.mark.slow

LESION_SEED = 100_011  # from the reference model's test range: a lesion it finds
SEG = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage (PS3.4 B.5)
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


def queued_job(settings: Settings, stack: IngestStack, tmp_path: Path) -> tuple[str, int]:
    """A lesion phantom received and complete: its study UID and the job it owes."""
    study = phantom_study(tmp_path / "study", LESION_SEED, lesion=True)
    stack.ingest(*study.paths)
    far = utcnow().replace(year=utcnow().year + 1)
    assert StudyCompletionWatcher(settings, stack.session_factory).poll(now=far)
    with session_scope(stack.session_factory) as session:
        return study.study_uid, session.scalars(select(Job.id)).one()


@pytest.fixture
def client(settings: Settings, stack_factory: StackFactory) -> Iterator[TestClient]:
    stack = stack_factory(settings)
    app = create_app(settings, stack.session_factory, CollectorRegistry())
    with TestClient(app) as test_client:
        with session_scope(stack.session_factory) as session:
            secret = create_token(db_session=session, name="dr.a", role=TokenRole.RADIOLOGIST)
        test_client.headers["Authorization"] = f"Bearer {secret}"
        yield test_client


def test_the_worklist_turns_critical_before_the_seg_and_sr_exist(
    settings: Settings,
    stack_factory: StackFactory,
    client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = stack_factory(settings)
    study_uid, job_id = queued_job(settings, stack, tmp_path)
    # The result stage is held back until the API has been read; then it runs as it would.
    make_results = workers.analysis.make_results
    reached, release = threading.Event(), threading.Event()

    def held(*args: Any) -> JobOutcome:
        reached.set()
        assert release.wait(120)
        return make_results(*args)

    monkeypatch.setattr(workers.analysis, "make_results", held)
    outcomes: list[JobOutcome] = []
    worker = threading.Thread(
        target=lambda: outcomes.append(analyze(WorkerContext(settings), job_id))
    )
    worker.start()
    try:
        assert reached.wait(180), "the job never reached its result stage"
        record = client.get(f"/api/studies/{study_uid}").json()
        assert record["worklist"]["tier"] == "critical"
        assert "critical" in [change["new_tier"] for change in record["priority_history"]]
        (job,) = record["jobs"]
        assert any(finding["positive"] for finding in job["findings"])
        assert record["results"] == []
        assert record["deliveries"] == []
        with session_scope(stack.session_factory) as session:
            assert session.scalar(select(ResultObject.id)) is None
            assert session.scalars(select(Notification.channel)).all()  # owed already
            pending = session.get(Job, job_id)
            assert pending is not None
            assert (pending.state, pending.results_pending) == (WorkState.DONE, True)
    finally:
        release.set()
        worker.join(180)
    assert outcomes == [JobOutcome.DONE]
    record = client.get(f"/api/studies/{study_uid}").json()
    assert record["worklist"]["tier"] == "critical"
    assert sorted(result["kind"] for result in record["results"]) == ["kos", "seg", "sr"]
    with session_scope(stack.session_factory) as session:
        classes = session.scalars(select(ResultObject.sop_class_uid)).all()
        assert sorted(classes) == sorted([SEG, COMPREHENSIVE_3D_SR, KEY_OBJECT_SELECTION])
        done = session.get(Job, job_id)
        assert done is not None
        assert done.results_pending is False
        assert "results" in done.timings
        refs = {f.mask_ref for f in session.scalars(select(Finding)) if f.mask_ref}
    # The label map each lesion names is written with the objects, after the findings.
    assert refs
    for ref in refs:
        file_name, _, segment = ref.partition("#")
        with np.load(settings.data_dir / "masks" / file_name) as saved:
            assert (saved["mask"] == int(segment)).any()


def test_a_worker_lost_before_the_results_leaves_a_job_the_sweeper_sends_again(
    settings: Settings, stack_factory: StackFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = stack_factory(settings)
    _study_uid, job_id = queued_job(settings, stack, tmp_path)

    def lost(*_args: Any) -> JobOutcome:
        raise SystemExit("worker lost")  # as a process that dies there: nothing after it runs

    monkeypatch.setattr(workers.analysis, "make_results", lost)
    with pytest.raises(SystemExit):
        analyze(WorkerContext(settings), job_id)
    monkeypatch.undo()

    def findings() -> list[tuple[str, float, bool]]:
        with session_scope(stack.session_factory) as session:
            rows = session.scalars(select(Finding).order_by(Finding.ordinal)).all()
            return [(row.kind, round(row.probability, 6), row.positive) for row in rows]

    stored = findings()
    assert any(positive for _, _, positive in stored)
    with session_scope(stack.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.results_pending) == (WorkState.DONE, True)

    sent: list[int] = []
    sweeper = Sweeper(settings, stack.session_factory, send_job=sent.append)
    assert sweeper.sweep() == []  # not yet overdue
    later = utcnow().replace(year=utcnow().year + 1)
    assert sweeper.sweep(now=later) == [job_id]
    with session_scope(stack.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.state == WorkState.DONE  # its findings stay on the worklist meanwhile

    assert analyze(WorkerContext(settings), job_id) == JobOutcome.DONE
    assert findings() == stored
    with session_scope(stack.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.results_pending is False
        assert job.attempts == 1  # the second run was for the objects, not a retry
        assert len(session.scalars(select(ResultObject)).all()) == 3  # SEG, SR, KOS
    # Now settled: a third delivery of the task changes nothing.
    assert analyze(WorkerContext(settings), job_id) == JobOutcome.ALREADY_DONE
    assert sweeper.sweep(now=later) == []


def test_a_re_run_for_the_objects_that_fails_for_good_leaves_the_findings_and_stops(
    settings: Settings, stack_factory: StackFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images are gone by the time the objects are owed: the job keeps its findings, says
    why the objects were not built, and the sweeper does not send it again and again."""
    stack = stack_factory(settings)
    study_uid, job_id = queued_job(settings, stack, tmp_path)

    def lost(*_args: Any) -> JobOutcome:
        raise SystemExit("worker lost")

    monkeypatch.setattr(workers.analysis, "make_results", lost)
    with pytest.raises(SystemExit):
        analyze(WorkerContext(settings), job_id)
    monkeypatch.undo()
    for path in (settings.data_dir / "spool").rglob("*"):
        if path.is_file():
            path.unlink()
    context = WorkerContext(settings)
    with pytest.raises(FileNotFoundError):
        analyze(context, job_id)
    # What analyze_study does with an error that is not retryable (workers/tasks.py).
    record_job_failure(context, job_id, "FileNotFoundError: gone", final=True)
    with session_scope(stack.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.results_pending) == (WorkState.DONE, False)
        assert job.reason is not None
        assert job.reason.startswith("findings stored; result objects not built")
        assert session.scalars(select(Finding)).all()
        kinds = session.scalars(
            select(AuditEvent.kind).where(AuditEvent.study_uid == study_uid)
        ).all()
        assert "results_failed" in kinds
    later = utcnow().replace(year=utcnow().year + 1)
    assert Sweeper(settings, stack.session_factory, send_job=lambda _: None).sweep(now=later) == []
