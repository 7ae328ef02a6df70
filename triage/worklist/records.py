"""What the API, the page and the CLI show of the worklist and of one study: typed records.

The fields are the public JSON (`GET /api/worklist`, `GET /api/studies/{uid}`, the `--json` of
`triage-admin worklist` and `study show`); times are ISO 8601 strings in UTC.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from triage.domain import ModelMode, ReadingState, ResultKind, StudyStatus, Tier, Verdict, WorkState


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
    key_image_url: str | None = Field(
        default=None, description="The study's most significant key image (PNG); null: none."
    )
    needs_acknowledgment: bool = Field(
        default=False, description="A critical AI alert nobody has acknowledged yet."
    )
    acknowledged_by: str | None = None
    awaiting_approval: bool = Field(
        default=False, description="A run in review mode waits for approval of its results."
    )


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
    id: int = Field(description="The finding's id, for feedback and ?finding= of the key image.")
    kind: str = Field(description="'score' (study level) or 'lesion'.")
    label: str
    code: str = Field(description="Coding scheme and code value, e.g. 'SCT:1386000'.")
    meaning: str
    probability: float
    positive: bool
    volume_ml: float | None
    location: dict[str, Any] | None
    key_image_url: str | None = Field(description="Its key image (PNG); null: none.")


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
    mode: ModelMode = Field(description="The model version's mode when the job ran.")
    held: bool = Field(description="In review mode and not approved: results and alerts wait.")
    approved_at: str | None
    approved_by: str | None
    findings: list[FindingRecord]
    queued_at: str = Field(description="When it was last queued (a retry or reprocess too).")
    started_at: str | None = Field(description="When its last run started; null: not yet.")
    finished_at: str | None = Field(description="When its last run ended; null: not yet.")


class ResultRecord(_Record):
    kind: ResultKind
    sop_instance_uid: str
    series_uid: str
    round: int
    retracted_at: str | None = Field(
        description="When a rejection note withdrew it (a later run no longer found it)."
    )


class DeliveryRecord(_Record):
    id: int
    result: ResultKind
    destination: str
    state: WorkState
    attempts: int
    last_error: str | None
    delivered_at: str | None
    result_uid: str = Field(description="The SOP Instance UID of the result object it sends.")
    next_attempt_at: str | None = Field(
        description="When a queued delivery is tried (again); null unless queued."
    )


class WorklistPosition(_Record):
    tier: Tier
    score: float
    reason: str
    due_at: str | None
    reading_state: ReadingState
    claimed_by: str | None
    acknowledged_at: str | None = Field(description="When its critical alert was acknowledged.")
    acknowledged_by: str | None


class PriorityChangeRecord(_Record):
    at: str
    old_tier: Tier | None
    new_tier: Tier
    old_score: float | None
    new_score: float
    reason: str


class FeedbackRecord(_Record):
    """A reader's verdict on a finding (``finding`` null: on the study, e.g. a miss)."""

    id: int
    finding: int | None
    model: str | None
    version: str | None
    label: str | None
    probability: float | None
    positive: bool | None
    verdict: Verdict
    comment: str | None
    reader: str
    at: str


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
    feedback: list[FeedbackRecord]
    viewer_url: str | None = Field(
        default=None, description="From viewer_url_template; null when unset."
    )
