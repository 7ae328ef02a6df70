"""Monitoring per model version: how each one is doing, by day, and whether its scores drift.

For each model version that ran in the window: studies analysed, positive rate, alert rate
(studies whose critical alert went out), feedback count, agreement rate (agree out of agree and
disagree), a positive-predictive-value estimate (agree out of agree and disagree, on positive
findings only), failures and the median run time; by day and in total.

Drift: the study-level scores of the version's runs over the last ``drift_window_days`` are
compared with the reference distribution in the model's sidecar (``score_reference``, measured
on its validation set when the model is made) as a population stability index
(``triage.drift``). Above ``drift_psi_threshold``, with at least ``drift_min_studies`` scores,
the version is in alarm: ``DriftMonitor`` logs it and records an audit event (``drift_alarm``,
and ``drift_cleared`` when it ends), the metrics say so, and the admin page shows a banner.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.catalog import ModelDescription, usable_models
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import AuditEvent, Feedback, Finding, Job, Notification, Study
from triage.db.session import SessionFactory, session_scope
from triage.domain import ModelMode, Verdict, WorkState
from triage.drift import ScoreReference, check_drift
from triage.metrics import DatabaseCollector
from triage.modes import modes
from triage.notify import registered_channels

log = logging.getLogger(__name__)

ALARM_EVENT = "drift_alarm"
CLEARED_EVENT = "drift_cleared"


@dataclass
class Counts:
    """One day's (or the window's) figures for a model version."""

    analysed: int = 0
    positive: int = 0
    alerts: int = 0
    failures: int = 0
    feedback: int = 0
    agree: int = 0
    disagree: int = 0
    unsure: int = 0
    ppv_agree: int = 0
    ppv_disagree: int = 0
    run_seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def rate(part: int, whole: int) -> float | None:
            return round(part / whole, 4) if whole else None

        return {
            "analysed": self.analysed,
            "positive_rate": rate(self.positive, self.analysed),
            "alert_rate": rate(self.alerts, self.analysed),
            "failures": self.failures,
            "feedback": self.feedback,
            "agree": self.agree,
            "disagree": self.disagree,
            "unsure": self.unsure,
            "agreement_rate": rate(self.agree, self.agree + self.disagree),
            "ppv_estimate": rate(self.ppv_agree, self.ppv_agree + self.ppv_disagree),
            "median_run_seconds": (
                round(statistics.median(self.run_seconds), 3) if self.run_seconds else None
            ),
        }


@dataclass(frozen=True)
class Drift:
    psi: float | None
    samples: int
    threshold: float
    min_samples: int
    verdict: str | None  # "drift", "stable", or None: too few scores
    alarm: bool
    reference_cases: int
    reference_measured_on: str
    window_days: float
    reference_edges: list[float]
    reference_proportions: list[float]


@dataclass(frozen=True)
class ModelStats:
    model: str
    version: str
    mode: ModelMode
    totals: dict[str, Any]
    days: list[dict[str, Any]]
    drift: Drift | None  # None: no reference distribution for this version
    scores: list[float]  # the window's study-level scores, for the admin page's histogram

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mode"] = str(self.mode)
        return data


def _reference(description: ModelDescription | None, version: str) -> ScoreReference | None:
    if description is None or description.version != version:
        return None
    try:
        return ScoreReference.from_sidecar((description.model_extra or {}).get("score_reference"))
    except ValueError as exc:
        log.warning("model sidecar: %s", exc, extra={"model": description.name})
        return None


def model_stats(
    db_session: Session,
    settings: Settings,
    *,
    now: datetime | None = None,
    days: int = 30,
    models: dict[str, ModelDescription] | None = None,
) -> list[ModelStats]:
    """Every model version that ran (or got feedback) in the last ``days`` days."""
    now = now or utcnow()
    since = now - timedelta(days=days)
    drift_since = now - timedelta(days=settings.drift_window_days)
    models = usable_models(settings) if models is None else models
    set_modes = modes(db_session)
    by_day: dict[tuple[str, str], dict[str, Counts]] = defaultdict(lambda: defaultdict(Counts))
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)

    jobs = db_session.execute(
        select(Job, Study.study_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Job.finished_at >= since, Job.state.in_((WorkState.DONE, WorkState.FAILED)))
    ).all()
    job_keys: dict[tuple[str, str, int], tuple[str, str]] = {}
    job_ids = [job.id for job, _ in jobs]
    findings: dict[int, list[Finding]] = defaultdict(list)
    if job_ids:
        for finding in db_session.scalars(select(Finding).where(Finding.job_id.in_(job_ids))):
            findings[finding.job_id].append(finding)
    for job, study_uid in jobs:
        key = (job.model_name, job.model_version)
        assert job.finished_at is not None
        day = by_day[key][job.finished_at.date().isoformat()]
        if job.state == WorkState.FAILED:
            day.failures += 1
            continue
        day.analysed += 1
        day.positive += any(f.positive for f in findings[job.id])
        day.run_seconds.append(sum(job.timings.values()))
        job_keys[(study_uid, job.model_name, job.round)] = key
        if job.finished_at >= drift_since:
            scores[key] += [f.probability for f in findings[job.id] if f.kind == "score"]

    alerted: set[tuple[str, str, int]] = set()
    for payload, at in db_session.execute(
        select(Notification.payload, Notification.created_at).where(
            Notification.created_at >= since,
            Notification.channel.in_(tuple(registered_channels())),
        )
    ):
        alert = (str(payload.get("study_uid")), str(payload.get("model")), payload.get("round", 0))
        owner = job_keys.get(alert)
        if alert in alerted or owner is None:
            continue
        alerted.add(alert)
        by_day[owner][at.date().isoformat()].alerts += 1

    for row in db_session.scalars(select(Feedback).where(Feedback.at >= since)):
        if row.model_name is None or row.model_version is None:
            continue
        day = by_day[(row.model_name, row.model_version)][row.at.date().isoformat()]
        day.feedback += 1
        day.agree += row.verdict == Verdict.AGREE
        day.disagree += row.verdict == Verdict.DISAGREE
        day.unsure += row.verdict == Verdict.UNSURE
        if row.positive:
            day.ppv_agree += row.verdict == Verdict.AGREE
            day.ppv_disagree += row.verdict == Verdict.DISAGREE

    result = []
    for (name, version), per_day in sorted(by_day.items()):
        total = Counts()
        for counts in per_day.values():
            for attribute in (
                "analysed", "positive", "alerts", "failures", "feedback",
                "agree", "disagree", "unsure", "ppv_agree", "ppv_disagree",
            ):  # fmt: skip
                setattr(total, attribute, getattr(total, attribute) + getattr(counts, attribute))
            total.run_seconds += counts.run_seconds
        reference = _reference(models.get(name), version)
        drift = None
        if reference is not None:
            check = check_drift(
                reference,
                scores[(name, version)],
                threshold=settings.drift_psi_threshold,
                min_samples=settings.drift_min_studies,
            )
            drift = Drift(
                psi=round(check.psi, 4) if check.psi is not None else None,
                samples=check.samples,
                threshold=check.threshold,
                min_samples=check.min_samples,
                verdict=check.verdict,
                alarm=check.alarm,
                reference_cases=reference.cases,
                reference_measured_on=reference.measured_on,
                window_days=settings.drift_window_days,
                reference_edges=list(reference.edges),
                reference_proportions=list(reference.proportions),
            )
        mode = set_modes.get((name, version)) or set_modes.get((name, "*")) or ModelMode.CLINICAL
        result.append(
            ModelStats(
                model=name,
                version=version,
                mode=mode,
                totals=total.summary(),
                days=[{"day": d, **c.summary()} for d, c in sorted(per_day.items())],
                drift=drift,
                scores=[round(s, 4) for s in scores[(name, version)]],
            )
        )
    return result


def record_alarms(db_session: Session, stats: Iterable[ModelStats]) -> list[ModelStats]:
    """Record an audit event (and a log line) when a version's drift alarm starts or ends;
    returns the versions whose alarm started now."""
    started = []
    for item in stats:
        if item.drift is None or item.drift.verdict is None:
            continue
        last = db_session.scalar(
            select(AuditEvent.kind)
            .where(AuditEvent.kind.in_((ALARM_EVENT, CLEARED_EVENT)))
            .where(AuditEvent.detail["model"].as_string() == item.model)
            .where(AuditEvent.detail["version"].as_string() == item.version)
            .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
            .limit(1)
        )
        detail: dict[str, Any] = {
            "model": item.model,
            "version": item.version,
            "psi": item.drift.psi,
            "threshold": item.drift.threshold,
            "samples": item.drift.samples,
        }
        if item.drift.alarm and last != ALARM_EVENT:
            add_event(db_session=db_session, kind=ALARM_EVENT, **detail)
            log.warning("model score drift: PSI above threshold", extra=detail)
            started.append(item)
        elif not item.drift.alarm and last == ALARM_EVENT:
            add_event(db_session=db_session, kind=CLEARED_EVENT, **detail)
            log.info("model score drift cleared", extra=detail)
    return started


class DriftMonitor:
    """Checks every model version's drift on a timer and records alarms (``triage serve``)."""

    POLL_SECONDS = 60.0

    def __init__(self, settings: Settings, session_factory: SessionFactory) -> None:
        self.settings = settings
        self.session_factory = session_factory

    def tick(self) -> list[ModelStats]:
        with session_scope(self.session_factory) as session:
            return record_alarms(session, model_stats(session, self.settings))

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.POLL_SECONDS):
            try:
                self.tick()
            except Exception:  # keep checking: the next tick tries again
                log.exception("drift check failed")


class ModelStatsCollector(DatabaseCollector):
    """Prometheus metrics of each model version, read from the database at each scrape."""

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        families = {
            "analysed": GaugeMetricFamily(
                "triage_model_studies_analysed",
                "Studies analysed, 30 days",
                labels=labels,
            ),
            "positive_rate": GaugeMetricFamily(
                "triage_model_positive_rate",
                "Share called positive",
                labels=labels,
            ),
            "alert_rate": GaugeMetricFamily(
                "triage_model_alert_rate", "Share of analysed studies alerted", labels=labels
            ),
            "agreement_rate": GaugeMetricFamily(
                "triage_model_agreement_rate", "Readers' agreement with the findings", labels=labels
            ),
            "failures": GaugeMetricFamily(
                "triage_model_failures", "Failed runs in the last 30 days", labels=labels
            ),
        }
        psi = GaugeMetricFamily(
            "triage_model_score_psi", "Score PSI against the sidecar's reference", labels=labels
        )
        alarm = GaugeMetricFamily(
            "triage_model_drift_alarm",
            "1 while the PSI is above threshold",
            labels=labels,
        )
        try:
            with session_scope(self.session_factory) as session:
                stats = model_stats(session, self.settings)
        except SQLAlchemyError as exc:  # the scrape still answers: triage_component_up says why
            log.warning("model metrics: the database cannot be read: %s", type(exc).__name__)
            return
        for item in stats:
            key = [item.model, item.version]
            for name, family in families.items():
                value = item.totals.get(name)
                if value is not None:
                    family.add_metric(key, float(value))
            if item.drift is not None:
                if item.drift.psi is not None:
                    psi.add_metric(key, item.drift.psi)
                alarm.add_metric(key, 1.0 if item.drift.alarm else 0.0)
        yield from families.values()
        yield psi
        yield alarm
