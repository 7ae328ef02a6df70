"""A study through triage's real pipeline, in the test's process: received, completed, and
each queued job analysed by the real worker code (the reference model on a lesion phantom)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from tests.conftest import StackFactory
from tests.helpers.orthanc import OrthancPeer
from tests.helpers.phantoms import phantom_study
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Job
from triage.db.session import SessionFactory, session_scope
from triage.ingest.completion import StudyCompletionWatcher
from workers.analysis import analyze
from workers.context import WorkerContext


def analyze_queued(context: WorkerContext, factory: SessionFactory) -> list[int]:
    """Run every queued job; each must end done. Returns their ids."""
    with session_scope(factory) as session:
        jobs = list(session.scalars(select(Job.id).where(Job.state == "queued").order_by(Job.id)))
    for job_id in jobs:
        assert analyze(context, job_id) == "done"
    return jobs


def analysed_phantom(
    settings: Settings,
    stack_factory: StackFactory,
    tmp_path: Path,
    pacs: list[OrthancPeer] = (),  # type: ignore[assignment]
    *,
    seed: int = 100_011,
) -> tuple[str, SessionFactory, WorkerContext]:
    """A lesion phantom (already in each of ``pacs``) received by triage, completed and
    analysed: its Study UID, the session factory and the worker context used."""
    study = phantom_study(tmp_path / "study", seed, lesion=True)
    for orthanc in pacs:
        orthanc.upload_all(study.paths)
    stack = stack_factory(settings)
    stack.ingest(*study.paths)
    far = utcnow().replace(year=utcnow().year + 1)
    assert StudyCompletionWatcher(settings, stack.session_factory).poll(now=far)
    context = WorkerContext(settings)
    assert len(analyze_queued(context, stack.session_factory)) == 1
    return study.study_uid, stack.session_factory, context
