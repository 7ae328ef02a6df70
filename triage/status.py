"""What ``triage-admin status`` reports: counts by state, queue depths and the latest errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage.db.base import utcnow
from triage.db.models import AuditEvent, Delivery, Instance, Job, Study

# Audit kinds that an administrator reads as errors.
ERROR_KINDS = (
    "rejection",
    "job_failed",
    "delivery_failed",
    "results_failed",
    "notification_failed",
    "spool_missing",
    "quarantine",
)


@dataclass(frozen=True)
class ErrorLine:
    at: datetime
    kind: str
    study_uid: str | None
    reason: str


@dataclass(frozen=True)
class StatusReport:
    instances: int
    studies: dict[str, int]
    jobs: dict[str, int]
    deliveries: dict[str, int]
    rejections_24h: dict[str, int]
    queue_depth: dict[str, int | None] = field(default_factory=dict)
    last_errors: list[ErrorLine] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["last_errors"] = [
            {**asdict(line), "at": line.at.isoformat()} for line in self.last_errors
        ]
        return data


def _counts(db_session: Session, column: Any) -> dict[str, int]:
    rows = db_session.execute(select(column, func.count()).group_by(column))
    return {str(state): int(count) for state, count in rows}


def collect_status(*, db_session: Session, error_limit: int = 10) -> StatusReport:
    """Counts straight from the database; the broker's view is added by the caller."""
    since = utcnow() - timedelta(hours=24)
    rejections = db_session.execute(
        select(AuditEvent.detail).where(AuditEvent.kind == "rejection", AuditEvent.at >= since)
    )
    by_reason: dict[str, int] = {}
    for (detail,) in rejections:
        reason = str(detail.get("reason", "unknown"))
        by_reason[reason] = by_reason.get(reason, 0) + 1
    errors = db_session.scalars(
        select(AuditEvent)
        .where(AuditEvent.kind.in_(ERROR_KINDS))
        .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
        .limit(error_limit)
    )
    return StatusReport(
        instances=db_session.scalar(select(func.count()).select_from(Instance)) or 0,
        studies=_counts(db_session, Study.status),
        jobs=_counts(db_session, Job.state),
        deliveries=_counts(db_session, Delivery.state),
        rejections_24h=by_reason,
        last_errors=[
            ErrorLine(e.at, e.kind, e.study_uid, str(e.detail.get("reason", ""))) for e in errors
        ],
    )
