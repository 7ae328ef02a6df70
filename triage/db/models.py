"""Tables for the whole system. The database is the source of truth; Celery messages carry ids.

Lengths follow the DICOM value representations: UI 64, AE 16, CS 16, LO 64, SH 16, PN 64 per
component group (five groups and separators fit in 324).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from triage.db.base import Base, UTCDateTime, enum_type, utcnow
from triage.domain import (
    InstanceState,
    ModelMode,
    PeerKind,
    ReadingState,
    ResultKind,
    StudyStatus,
    Tier,
    TokenRole,
    Verdict,
    WorkState,
)

UID = String(64)
AE = String(16)


def _created() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    status: Mapped[StudyStatus] = mapped_column(
        enum_type(StudyStatus), default=StudyStatus.RECEIVING, index=True
    )
    status_reason: Mapped[str | None] = mapped_column(String(500))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    # Indexed for QIDO-RS: the keys archives search by most.
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    modalities: Mapped[str | None] = mapped_column(String(64))
    order_priority: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(AE)
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    analysis_round: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = _created()
    last_received_at: Mapped[datetime] = _created()
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created()

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete")


class Instance(Base):
    """One stored object. A re-send with other content under the same UID is a new version."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    file_id: Mapped[str] = mapped_column(String(36), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # "<algorithm>:<hex>" of the spool file (triage.storage.spool.content_digest); rows from
    # before migration 0005 carry "sha256:<hex>".
    digest: Mapped[str] = mapped_column(String(80))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[InstanceState] = mapped_column(
        enum_type(InstanceState), default=InstanceState.STORED
    )
    calling_ae: Mapped[str | None] = mapped_column(AE)
    received_at: Mapped[datetime] = _created()

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One model run on one study; re-analysis re-queues the same row with a higher round."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "model_name", "model_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    state: Mapped[WorkState] = mapped_column(
        enum_type(WorkState), default=WorkState.QUEUED, index=True
    )
    round: Mapped[int] = mapped_column(Integer, default=1)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    series_uid: Mapped[str | None] = mapped_column(UID)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    # Findings stored, SEG and SR not yet recorded: the sweeper re-sends a job left so.
    results_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The model version's mode when the job ran; a review job's results and alerts wait for
    # an approval.
    mode: Mapped[ModelMode] = mapped_column(
        enum_type(ModelMode), default=ModelMode.CLINICAL, server_default=ModelMode.CLINICAL.value
    )
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    approved_by: Mapped[str | None] = mapped_column(String(64))
    queued_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    touched_at: Mapped[datetime] = _created()

    study: Mapped[Study] = relationship(back_populates="jobs")
    findings: Mapped[list[Finding]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Finding.ordinal"
    )
    results: Mapped[list[ResultObject]] = relationship(back_populates="job", cascade="all, delete")


class Finding(Base):
    """A model output: a study-level score or one detected lesion."""

    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("job_id", "ordinal"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(64))
    code_scheme: Mapped[str] = mapped_column(String(16))
    code_value: Mapped[str] = mapped_column(String(16))
    code_meaning: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    volume_ml: Mapped[float | None] = mapped_column(Float)
    location: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    mask_ref: Mapped[str | None] = mapped_column(String(255))
    # The PNG preview of a positive finding, in the data directory's key-images folder.
    key_image_ref: Mapped[str | None] = mapped_column(String(255))

    job: Mapped[Job] = relationship(back_populates="findings")


class ResultObject(Base):
    """A SEG or SR we built for a job; its UIDs are derived, so a re-run replaces it."""

    __tablename__ = "result_objects"
    __table_args__ = (UniqueConstraint("job_id", "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[ResultKind] = mapped_column(enum_type(ResultKind))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_uid: Mapped[str] = mapped_column(UID)
    file_id: Mapped[str] = mapped_column(String(36), unique=True)
    round: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = _created()
    # Withdrawn by a rejection note after a later run no longer found what this one reported.
    retracted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="result", cascade="all, delete"
    )


class Delivery(Base):
    """One result object owed to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(
        ForeignKey("result_objects.id", ondelete="CASCADE"), index=True
    )
    destination: Mapped[str] = mapped_column(String(128))
    state: Mapped[WorkState] = mapped_column(
        enum_type(WorkState), default=WorkState.QUEUED, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = _created()
    touched_at: Mapped[datetime] = _created()

    result: Mapped[ResultObject] = relationship(back_populates="deliveries")


class DestinationState(Base):
    """How a destination has been answering; a destination that keeps failing is paused."""

    __tablename__ = "destination_states"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    paused_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class WorklistEntry(Base):
    """Where a study stands on the reading worklist, and who is reading it."""

    __tablename__ = "worklist_entries"
    __table_args__ = (
        # The worklist query: open entries in reading order, first page straight off the index.
        Index(
            "ix_worklist_open_order",
            "tier_rank",
            text("score DESC"),
            postgresql_where=text("reading_state IN ('unread', 'claimed')"),
            sqlite_where=text("reading_state IN ('unread', 'claimed')"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), unique=True)
    tier: Mapped[Tier] = mapped_column(enum_type(Tier), default=Tier.ROUTINE)
    tier_rank: Mapped[int] = mapped_column(Integer, default=2)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str] = mapped_column(String(500), default="")
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reading_state: Mapped[ReadingState] = mapped_column(
        enum_type(ReadingState), default=ReadingState.UNREAD
    )
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The most severe critical finding (probability, then volume): orders a tier's studies
    # that have waited equally long.
    severity_probability: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    severity_volume: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    acknowledged_by: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class PriorityChange(Base):
    """Every change of a study's priority, with the reason shown to radiologists."""

    __tablename__ = "priority_changes"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    changed_at: Mapped[datetime] = _created()
    old_tier: Mapped[Tier | None] = mapped_column(enum_type(Tier))
    new_tier: Mapped[Tier] = mapped_column(enum_type(Tier))
    old_score: Mapped[float | None] = mapped_column(Float)
    new_score: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(500))


class Notification(Base):
    """An outward message owed (webhook, HL7), sent and retried by the notifier.

    ``dedup_key`` makes it exactly one message per critical finding and round.
    """

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    dedup_key: Mapped[str] = mapped_column(String(255), unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[WorkState] = mapped_column(
        enum_type(WorkState), default=WorkState.QUEUED, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = _created()
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = _created()


class Peer(Base):
    """A DICOM or DICOMweb node an administrator added with ``triage-admin peers add``."""

    __tablename__ = "peers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[PeerKind] = mapped_column(enum_type(PeerKind))
    ae_title: Mapped[str | None] = mapped_column(AE)
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    url: Mapped[str | None] = mapped_column(String(1024))
    is_destination: Mapped[bool] = mapped_column(Boolean, default=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _created()


class ApiToken(Base):
    """A bearer token for the HTTP API; only its SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[TokenRole] = mapped_column(enum_type(TokenRole))
    created_at: Mapped[datetime] = _created()
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    """Something an administrator may need to see later: rejections, new versions, retries.

    ``detail`` holds UIDs, AE titles, counts and reasons: never patient data.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    actor: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Source(Base):
    """An archive triage polls for new studies (``triage-admin sources add``), and where its
    polling stands: the StudyDate it searches from, and when to look next."""

    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[PeerKind] = mapped_column(enum_type(PeerKind))
    url: Mapped[str | None] = mapped_column(String(1024))
    ae_title: Mapped[str | None] = mapped_column(AE)
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    modalities: Mapped[str | None] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    search_from: Mapped[str] = mapped_column(String(8))
    next_poll_at: Mapped[datetime] = _created()
    last_polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class PulledStudy(Base):
    """A study retrieved from a source: not retrieved again."""

    __tablename__ = "pulled_studies"
    __table_args__ = (UniqueConstraint("source_id", "study_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    study_uid: Mapped[str] = mapped_column(UID)
    instances: Mapped[int] = mapped_column(Integer)
    pulled_at: Mapped[datetime] = _created()


ALL_VERSIONS = "*"
"""``ModelModeSetting.model_version`` for a mode that applies to every version of a model."""


class ModelModeSetting(Base):
    """The deployment mode an administrator gave a model version (``models mode``); a version
    without a row of its own takes its model's ``*`` row, and without that is clinical."""

    __tablename__ = "model_modes"
    __table_args__ = (UniqueConstraint("model_name", "model_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    mode: Mapped[ModelMode] = mapped_column(enum_type(ModelMode))
    changed_at: Mapped[datetime] = _created()
    changed_by: Mapped[str | None] = mapped_column(String(64))


class Feedback(Base):
    """A reader's verdict on one finding, or on the study (``finding_id`` empty: a miss).

    The finding's model, label, probability and call are copied, so the verdict still counts
    for its model version after a re-run replaced the finding.
    """

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    finding_id: Mapped[int | None] = mapped_column(ForeignKey("findings.id", ondelete="SET NULL"))
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    label: Mapped[str | None] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float)
    positive: Mapped[bool | None] = mapped_column(Boolean)
    verdict: Mapped[Verdict] = mapped_column(enum_type(Verdict))
    comment: Mapped[str | None] = mapped_column(Text)
    reader: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class WorkerHeartbeat(Base):
    """A Celery worker's last sign of life (``triage.heartbeat``): host:pid and its queues."""

    __tablename__ = "worker_heartbeats"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    queues: Mapped[str] = mapped_column(String(255), default="")
    version: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[datetime] = _created()
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
