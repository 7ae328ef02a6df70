"""What the API, the page and the CLI show of the worklist and of one study: typed records.

The fields are the public JSON (`GET /api/worklist`, `GET /api/studies/{uid}`, the `--json` of
`triage-admin worklist` and `study show`); times are ISO 8601 strings in UTC.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from triage.domain import ReadingState, ResultKind, StudyStatus, Tier, WorkState


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class WorklistRow(_Record):
    """One study on the worklist, as the page lists it."""

    study_uid: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_description: str | None
    modalities: str | None = Field(description="Modalities in the study, backslash-separated.")
    status: StudyStatus
    tier: Tier
    score: float = Field(description="Share of the tier's target turnaround used (1.0: due).")
    reason: str = Field(description="Why the study is where it is, for the reader.")
    received_at: str
    due_at: str | None
    reading_state: ReadingState
    claimed_by: str | None
    claim_expires_at: str | None
    waited_seconds: float
    due_in_seconds: float | None = Field(description="Negative once the study is overdue.")
    viewer_url: str | None = Field(description="From viewer_url_template; null when unset.")


class TargetMinutes(_Record):
    """Target turnaround per tier, in minutes."""

    critical: float
    urgent: float
    routine: float


class WorklistPage(_Record):
    """A page of the worklist, most urgent first."""

    items: list[WorklistRow]
    limit: int
    offset: int
    targets_minutes: TargetMinutes


class SeriesRecord(_Record):
    series_uid: str
    modality: str | None
    description: str | None
    instances: int


class FindingRecord(_Record):
    kind: str = Field(description="'score' (study level) or 'lesion'.")
    label: str
    code: str = Field(description="Coding scheme and code value, e.g. 'SCT:1386000'.")
    meaning: str
    probability: float
    positive: bool
    volume_ml: float | None
    location: dict[str, Any] | None


class JobRecord(_Record):
    id: int
    model: str
    version: str
    state: WorkState
    round: int
    attempts: int
    reason: str | None
    series_uid: str | None
    timings: dict[str, float] = Field(description="Seconds per stage of the last run.")
    findings: list[FindingRecord]


class ResultRecord(_Record):
    kind: ResultKind
    sop_instance_uid: str
    series_uid: str
    round: int


class DeliveryRecord(_Record):
    id: int
    result: ResultKind
    destination: str
    state: WorkState
    attempts: int
    last_error: str | None
    delivered_at: str | None


class WorklistPosition(_Record):
    tier: Tier
    score: float
    reason: str
    due_at: str | None
    reading_state: ReadingState
    claimed_by: str | None


class PriorityChangeRecord(_Record):
    at: str
    old_tier: Tier | None
    new_tier: Tier
    old_score: float | None
    new_score: float
    reason: str


class StudyRecord(_Record):
    """Everything known about one study."""

    study_uid: str
    status: StudyStatus
    status_reason: str | None
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_description: str | None
    modalities: str | None
    order_priority: str | None
    analysis_round: int
    received_at: str
    completed_at: str | None
    series: list[SeriesRecord]
    jobs: list[JobRecord]
    results: list[ResultRecord]
    deliveries: list[DeliveryRecord]
    worklist: WorklistPosition | None
    priority_history: list[PriorityChangeRecord]
