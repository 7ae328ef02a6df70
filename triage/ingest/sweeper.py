"""The sweeper: the database, not the broker, decides what is owed.

A job that sits queued past ``job_resend_seconds`` (a lost message, a broker restart, the
embedded broker after a worker was killed), running past ``job_timeout_seconds`` (its worker
died), or done with its SEG and SR still owed past ``job_timeout_seconds`` (its worker died
between storing the findings and recording the objects) is sent again. Tasks are idempotent,
so a duplicate costs time, never correctness.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from triage.audit import add_event
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Delivery, Job, Study
from triage.db.session import SessionFactory, session_scope
from triage.domain import WorkState

log = logging.getLogger(__name__)


class Sweeper:
    POLL_SECONDS = 5.0

    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory,
        send_job: Callable[[int], object],
        send_delivery: Callable[[int], object] | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.send_job = send_job
        self.send_delivery = send_delivery

    def sweep(self, now: datetime | None = None) -> list[int]:
        """Re-send every overdue job and delivery; return the job ids."""
        now = now or utcnow()
        if self.send_delivery is not None:
            for delivery_id in self._overdue_deliveries(now):
                self.send_delivery(delivery_id)
        return self._overdue_jobs(now)

    def _overdue_deliveries(self, now: datetime) -> list[int]:
        """Deliveries whose next attempt is long past, or whose sender died mid-send."""
        queued_before = now - timedelta(seconds=self.settings.job_resend_seconds)
        running_before = now - timedelta(seconds=self.settings.job_timeout_seconds)
        with session_scope(self.session_factory) as session:
            overdue = session.scalars(
                select(Delivery).where(
                    or_(
                        (Delivery.state == WorkState.QUEUED)
                        & (Delivery.touched_at < queued_before),
                        (Delivery.state == WorkState.RUNNING)
                        & (Delivery.touched_at < running_before),
                    )
                )
            ).all()
            for delivery in overdue:
                delivery.state = WorkState.QUEUED
                delivery.touched_at = now
            return [delivery.id for delivery in overdue]

    def _overdue_jobs(self, now: datetime) -> list[int]:
        queued_before = now - timedelta(seconds=self.settings.job_resend_seconds)
        running_before = now - timedelta(seconds=self.settings.job_timeout_seconds)
        with session_scope(self.session_factory) as session:
            overdue = session.scalars(
                select(Job).where(
                    or_(
                        (Job.state == WorkState.QUEUED) & (Job.touched_at < queued_before),
                        (Job.state == WorkState.RUNNING) & (Job.touched_at < running_before),
                        (Job.state == WorkState.DONE)
                        & Job.results_pending
                        & (Job.touched_at < running_before),
                    )
                )
            ).all()
            for job in overdue:
                study_uid = session.scalar(select(Study.study_uid).where(Study.id == job.study_id))
                add_event(
                    db_session=session,
                    kind="job_resent",
                    study_uid=study_uid,
                    job_id=job.id,
                    previous_state=str(job.state),
                )
                if job.state != WorkState.DONE:  # a done job keeps its findings on the worklist
                    job.state = WorkState.QUEUED
                job.touched_at = now
            job_ids = [job.id for job in overdue]
        for job_id in job_ids:
            self.send_job(job_id)
        if job_ids:
            log.warning("re-sent %d overdue jobs", len(job_ids), extra={"job_ids": job_ids})
        return job_ids

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.POLL_SECONDS):
            try:
                self.sweep()
            except Exception:  # keep sweeping: the next round retries
                log.exception("sweep failed")
