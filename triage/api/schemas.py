"""Response bodies of the API's own routes (the worklist and study records are in
``triage.worklist.records``), so that ``/api/docs`` shows every schema."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from triage.db.models import WorklistEntry
from triage.domain import ReadingState, Verdict


class ReadingStatus(BaseModel):
    """A study's reading state after a claim, a release or a read."""

    model_config = ConfigDict(frozen=True)

    reading_state: ReadingState
    claimed_by: str | None
    claim_expires_at: str | None

    @classmethod
    def of(cls, entry: WorklistEntry) -> ReadingStatus:
        expires = entry.claim_expires_at
        return cls(
            reading_state=entry.reading_state,
            claimed_by=entry.claimed_by,
            claim_expires_at=expires.isoformat() if expires else None,
        )


class Reprocessing(BaseModel):
    """The jobs queued by a reprocess request."""

    queued_jobs: list[int]


class Health(BaseModel):
    """``/healthz`` when the database answers."""

    status: str = "ok"
    version: str


class Unhealthy(BaseModel):
    """``/healthz`` when the database does not answer (HTTP 503)."""

    status: str = "unavailable"
    database: str


class Problem(BaseModel):
    """An error: FastAPI's ``{"detail": ...}``."""

    detail: str


class FeedbackRequest(BaseModel):
    """A reader's verdict on one finding, or on the study (``finding`` null: e.g. a miss)."""

    finding: int | None = Field(default=None, description="A finding id from the study record.")
    verdict: Verdict
    comment: str | None = Field(default=None, description="Free text, shown as text only.")


class Acknowledgment(BaseModel):
    """Who acknowledged the study's critical alert, and when."""

    acknowledged_at: str
    acknowledged_by: str


class ApprovalResult(BaseModel):
    """The runs an approval released, and the deliveries it queued."""

    approved_jobs: list[int]
    queued_deliveries: list[int]
