"""When is a study complete? Quiet for ``study_quiet_seconds``; or its association released and
``association_grace_seconds`` passed with nothing new; or the expected instance count reached.

A late instance sends a study back to ``receiving`` (see index.py); it completes again later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.catalog import ModelDescription, usable_models
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Instance, Series, Study
from triage.db.session import SessionFactory, session_scope
from triage.domain import StudyStatus
from triage.ingest.jobs import queue_jobs
from triage.ingest.routing import StudyFacts, select_models
from triage.worklist.service import policy_config, reprioritize

log = logging.getLogger(__name__)

Catalog = Callable[[], Mapping[str, ModelDescription]]
SendJob = Callable[[int], object]


def study_facts(*, db_session: Session, study: Study) -> StudyFacts:
    series = db_session.scalars(select(Series).where(Series.study_id == study.id)).all()
    return StudyFacts(
        modalities=frozenset(s.modality.upper() for s in series if s.modality),
        body_parts=frozenset(s.body_part.upper() for s in series if s.body_part),
        study_description=study.study_description or "",
        series_descriptions=frozenset(s.series_description for s in series if s.series_description),
        calling_ae=study.calling_ae or "",
    )


class StudyCompletionWatcher:
    """Polls the index for studies that have become complete and hands them to routing."""

    POLL_SECONDS = 0.25

    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory,
        *,
        catalog: Catalog | None = None,
        send_job: SendJob | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.catalog = catalog or (lambda: usable_models(settings))
        self.send_job = send_job
        self._released: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def association_ended(self, study_uids: set[str]) -> None:
        """The association that carried these studies was released by its sender."""
        now = utcnow()
        with self._lock:
            for uid in study_uids:
                self._released[uid] = now

    def _reason(self, db_session: Session, study: Study, now: datetime) -> str | None:
        quiet = timedelta(seconds=self.settings.study_quiet_seconds)
        grace = timedelta(seconds=self.settings.association_grace_seconds)
        if now - study.last_received_at >= quiet:
            return "quiet period"
        with self._lock:
            released = self._released.get(study.study_uid)
        if released is not None and released >= study.last_received_at and now - released >= grace:
            return "association released"
        if study.expected_instances:
            count = db_session.scalar(
                select(func.count(Instance.id))
                .join(Series, Instance.series_id == Series.id)
                .where(Series.study_id == study.id)
            )
            if (count or 0) >= study.expected_instances:
                return "expected instance count reached"
        return None

    def poll(self, now: datetime | None = None) -> list[str]:
        """Complete every study that is due; return their UIDs."""
        now = now or utcnow()
        completed = []
        job_ids: list[int] = []
        with session_scope(self.session_factory) as session:
            receiving = session.scalars(
                select(Study).where(Study.status == StudyStatus.RECEIVING)
            ).all()
            for study in receiving:
                reason = self._reason(session, study, now)
                if reason is None:
                    continue
                job_ids += self._complete(session, study, reason, now)
                completed.append(study.study_uid)
        with self._lock:
            for uid in completed:
                self._released.pop(uid, None)
        if self.send_job is not None:
            for job_id in job_ids:  # after the commit, so a worker finds the row
                self.send_job(job_id)
        return completed

    def _complete(self, db_session: Session, study: Study, reason: str, now: datetime) -> list[int]:
        """Mark the study complete and queue the models its routing rules pick."""
        study.status = StudyStatus.COMPLETE
        study.status_reason = reason
        study.completed_at = now
        study.analysis_round += 1
        facts = study_facts(db_session=db_session, study=study)
        models = select_models(self.settings.routing_rules, facts)
        available = self.catalog()
        missing = [name for name in models if name not in available]
        add_event(
            db_session=db_session,
            kind="study_complete",
            study_uid=study.study_uid,
            reason=reason,
            round=study.analysis_round,
            models=models,
            missing_models=missing,
        )
        log.info(
            "study complete (%s)",
            reason,
            extra={"study_uid": study.study_uid, "round": study.analysis_round, "models": models},
        )
        job_ids = queue_jobs(
            db_session=db_session,
            study=study,
            models=[available[name] for name in models if name in available],
        )
        if not models:
            study.status = StudyStatus.ANALYZED
            study.status_reason = "no routing rule applies"
        elif not job_ids:
            study.status = StudyStatus.FAILED
            study.status_reason = f"model not installed: {', '.join(missing)}"
        db_session.flush()
        reprioritize(
            db_session=db_session,
            study=study,
            now=now,
            config=policy_config(self.settings),
            models=available,
        )
        return job_ids

    def next_wait(self, now: datetime | None = None) -> float:
        """Seconds until the next poll: POLL_SECONDS, or less where a released study's grace
        period runs out sooner, so that it completes when its grace ends, not up to a poll
        later."""
        now = now or utcnow()
        grace = timedelta(seconds=self.settings.association_grace_seconds)
        with self._lock:
            ahead = [
                (released + grace - now).total_seconds() for released in self._released.values()
            ]
        return min([self.POLL_SECONDS, *(seconds for seconds in ahead if seconds > 0)])

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.next_wait()):
            try:
                self.poll()
            except Exception:  # keep watching: the next poll retries
                log.exception("completion poll failed")
