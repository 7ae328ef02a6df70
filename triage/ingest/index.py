"""Index rows for a stored instance: study, series, instance, in one transaction."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from triage.db.models import Instance, Series, Study, StudyStatus
from triage.dicom.header import InstanceHeader
from triage.ingest.audit import add_event
from triage.receiver.spool import SpooledFile


class StoreOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical content already held: nothing added
    NEW_VERSION = "new-version"  # same SOP Instance UID, other content: kept beside the old


@dataclass(frozen=True)
class IndexResult:
    outcome: StoreOutcome
    study_uid: str
    reopened: bool = False


def find_identical(*, db_session: Session, sop_instance_uid: str, sha256: str) -> bool:
    found = db_session.scalar(
        select(Instance.id).where(
            Instance.sop_instance_uid == sop_instance_uid, Instance.sha256 == sha256
        )
    )
    return found is not None


def _insert_ignoring_conflict(db_session: Session, model: Any, values: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: two associations may bring the same study at once."""
    dialect = db_session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    db_session.execute(insert(model).values(**values).on_conflict_do_nothing())


def _study(db_session: Session, header: InstanceHeader, calling_ae: str | None) -> Study:
    study = db_session.scalar(select(Study).where(Study.study_uid == header.study_uid))
    if study is None:
        _insert_ignoring_conflict(
            db_session,
            Study,
            {
                "study_uid": header.study_uid,
                "status": StudyStatus.RECEIVING,
                "analysis_round": 0,
                "calling_ae": calling_ae,
            },
        )
        study = db_session.scalars(select(Study).where(Study.study_uid == header.study_uid)).one()
    for attribute in (
        "patient_name",
        "patient_id",
        "accession_number",
        "study_date",
        "study_time",
        "study_description",
        "order_priority",
        "expected_instances",
    ):
        value = getattr(header, attribute)
        if value is not None and getattr(study, attribute) is None:
            setattr(study, attribute, value)
    if header.modality:
        modalities = set(filter(None, (study.modalities or "").split("\\")))
        if header.modality not in modalities:
            study.modalities = "\\".join(sorted(modalities | {header.modality}))[:64]
    return study


def _series(db_session: Session, header: InstanceHeader, study: Study) -> Series:
    series = db_session.scalar(select(Series).where(Series.series_uid == header.series_uid))
    if series is None:
        _insert_ignoring_conflict(
            db_session,
            Series,
            {
                "study_id": study.id,
                "series_uid": header.series_uid,
                "modality": header.modality,
                "body_part": header.body_part,
                "series_description": header.series_description,
                "series_number": header.series_number,
            },
        )
        series = db_session.scalars(
            select(Series).where(Series.series_uid == header.series_uid)
        ).one()
    return series


def index_instance(
    *,
    db_session: Session,
    header: InstanceHeader,
    spooled: SpooledFile,
    calling_ae: str | None,
    now: datetime,
) -> IndexResult:
    """Add the rows for one spooled instance; the caller commits, then answers Success.

    A concurrent insert of the same version raises IntegrityError: the caller retries.
    """
    if find_identical(
        db_session=db_session, sop_instance_uid=header.sop_instance_uid, sha256=spooled.sha256
    ):
        return IndexResult(StoreOutcome.DUPLICATE, header.study_uid)
    study = _study(db_session, header, calling_ae)
    series = _series(db_session, header, study)
    latest = db_session.scalar(
        select(func.max(Instance.version)).where(
            Instance.sop_instance_uid == header.sop_instance_uid
        )
    )
    version = (latest or 0) + 1
    db_session.add(
        Instance(
            series_id=series.id,
            sop_instance_uid=header.sop_instance_uid,
            version=version,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            file_id=spooled.file_id,
            size_bytes=spooled.size_bytes,
            sha256=spooled.sha256,
            instance_number=header.instance_number,
            calling_ae=calling_ae,
            received_at=now,
        )
    )
    outcome = StoreOutcome.STORED
    if version > 1:
        outcome = StoreOutcome.NEW_VERSION
        add_event(
            db_session=db_session,
            kind="new_version",
            study_uid=header.study_uid,
            actor=calling_ae,
            sop_instance_uid=header.sop_instance_uid,
            version=version,
        )
    reopened = study.status != StudyStatus.RECEIVING
    if reopened:
        add_event(
            db_session=db_session,
            kind="study_reopened",
            study_uid=header.study_uid,
            actor=calling_ae,
            previous_status=str(study.status),
            sop_instance_uid=header.sop_instance_uid,
        )
        study.status = StudyStatus.RECEIVING
        study.status_reason = "late instance after completion"
    study.last_received_at = now
    return IndexResult(outcome, header.study_uid, reopened)
