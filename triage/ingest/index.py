"""Index rows for a stored instance: study, series, instance, in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, exists, insert, literal_column, select, update
from sqlalchemy.dialects import postgresql, sqlite

from triage.audit import add_event
from triage.db.models import Instance, Series, Study
from triage.db.prepared import Prepared
from triage.dicom.header import InstanceHeader
from triage.domain import IndexOutcome, InstanceState, StudyStatus
from triage.storage.spool import SpooledFile

SameContent = Callable[[str], bool]
"""Whether the spool file with this id holds the data set of the instance being indexed."""


@dataclass(frozen=True)
class IndexResult:
    outcome: IndexOutcome
    study_uid: str
    reopened: bool = False


# The index runs once per received instance, before Success: its statements are compiled once
# and run on the DBAPI cursor (see triage.db.prepared), in the caller's transaction. The rare
# inserts of a new study or series stay in Core.
_VERSIONS = Prepared(
    select(Instance.version, Instance.file_id).where(
        Instance.sop_instance_uid == bindparam("sop_instance_uid")
    )
)
_FILLED_IN = (
    "patient_name",
    "patient_id",
    "accession_number",
    "study_date",
    "study_time",
    "study_description",
    "order_priority",
    "expected_instances",
)
_STUDY_COLUMNS = ("id", "status", "modalities", *_FILLED_IN)
_STUDY = Prepared(
    select(*(getattr(Study, name) for name in _STUDY_COLUMNS)).where(
        Study.study_uid == bindparam("study_uid")
    )
)
_SERIES_ID = Prepared(select(Series.id).where(Series.series_uid == bindparam("series_uid")))
# What one instance needs to know first, in one statement: whether its SOP Instance UID is
# held already (the versions are read only then), its series' id and its study's row (NULLs
# for a series or study not seen before).
_LOOKUP = Prepared(
    select(
        exists().where(Instance.sop_instance_uid == bindparam("sop_instance_uid")),
        select(Series.id).where(Series.series_uid == bindparam("series_uid")).scalar_subquery(),
        *(getattr(Study, name) for name in _STUDY_COLUMNS),
    ).select_from(
        select(literal_column("1"))
        .subquery("one")
        .outerjoin(Study, Study.study_uid == bindparam("study_uid"))
    )
)
_UPDATE_STUDY = Prepared(update(Study).where(Study.id == bindparam("study_pk")))  # SET: the rest
_INSERT_INSTANCE = Prepared(insert(Instance))


def _study_row(connection: Connection, study_uid: str) -> dict[str, Any] | None:
    rows = _STUDY.rows(connection, {"study_uid": study_uid})
    return dict(zip(_STUDY_COLUMNS, rows[0], strict=True)) if rows else None


def _insert_ignoring_conflict(connection: Connection, model: Any, values: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: two associations may bring the same study at once."""
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    connection.execute(insert(model).values(**values).on_conflict_do_nothing())


def _study(
    connection: Connection,
    header: InstanceHeader,
    study: dict[str, Any] | None,
    calling_ae: str | None,
    now: datetime,
) -> tuple[int, StudyStatus]:
    """The study's id and status before this instance (``study``: its row, None when there
    was none); fills in what it did not know yet."""
    if study is None:
        _insert_ignoring_conflict(
            connection,
            Study,
            {
                "study_uid": header.study_uid,
                "status": StudyStatus.RECEIVING,
                "analysis_round": 0,
                "calling_ae": calling_ae,
            },
        )
        study = _study_row(connection, header.study_uid)
        if study is None:
            raise LookupError("study row vanished right after its insert")
    status = StudyStatus(study["status"])
    changes: dict[str, Any] = {"last_received_at": now}
    for name in _FILLED_IN:
        value = getattr(header, name)
        if value is not None and study[name] is None:
            changes[name] = value
    if header.modality:
        modalities = set(filter(None, (study["modalities"] or "").split("\\")))
        if header.modality not in modalities:
            changes["modalities"] = "\\".join(sorted(modalities | {header.modality}))[:64]
    if status != StudyStatus.RECEIVING:
        changes["status"] = StudyStatus.RECEIVING
        changes["status_reason"] = "late instance after completion"
    _UPDATE_STUDY.run(connection, {"study_pk": study["id"], "updated_at": now, **changes})
    return int(study["id"]), status


def _new_series_id(connection: Connection, header: InstanceHeader, study_id: int) -> int:
    """The id of the instance's series, inserted (another association may be doing the same)."""
    _insert_ignoring_conflict(
        connection,
        Series,
        {
            "study_id": study_id,
            "series_uid": header.series_uid,
            "modality": header.modality,
            "body_part": header.body_part,
            "series_description": header.series_description,
            "series_number": header.series_number,
        },
    )
    return int(_SERIES_ID.rows(connection, {"series_uid": header.series_uid})[0][0])


def index_instance(
    *,
    connection: Connection,
    header: InstanceHeader,
    spooled: SpooledFile,
    same_content: SameContent,
    calling_ae: str | None,
    now: datetime,
) -> IndexResult:
    """Add the rows for one spooled instance; the caller commits, then answers Success.

    An instance whose SOP Instance UID is held already is a duplicate when a held version's
    file carries the same data set (``same_content``: the file meta aside, which names the
    sender and the receiving software, so a re-send through another AE title is a duplicate
    too); the files are compared byte by byte, and only re-sends pay for it.
    A concurrent insert of the same version raises IntegrityError: the caller retries.
    """
    uid = header.sop_instance_uid
    held, series_id, *study_values = _LOOKUP.rows(
        connection,
        {"sop_instance_uid": uid, "series_uid": header.series_uid, "study_uid": header.study_uid},
    )[0]
    versions = _VERSIONS.rows(connection, {"sop_instance_uid": uid}) if held else []
    if any(same_content(file_id) for _version, file_id in versions):
        return IndexResult(IndexOutcome.DUPLICATE, header.study_uid)
    version = max((row[0] for row in versions), default=0) + 1
    study = dict(zip(_STUDY_COLUMNS, study_values, strict=True))
    study_id, previous_status = _study(
        connection, header, study if study["id"] is not None else None, calling_ae, now
    )
    if series_id is None:
        series_id = _new_series_id(connection, header, study_id)
    _INSERT_INSTANCE.run(
        connection,
        {
            "series_id": series_id,
            "sop_instance_uid": header.sop_instance_uid,
            "version": version,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "file_id": spooled.file_id,
            "size_bytes": spooled.size_bytes,
            "digest": spooled.digest,
            "instance_number": header.instance_number,
            "state": InstanceState.STORED,
            "calling_ae": calling_ae,
            "received_at": now,
        },
    )
    outcome = IndexOutcome.STORED
    if version > 1:
        outcome = IndexOutcome.NEW_VERSION
        add_event(
            db_session=connection,
            kind="new_version",
            study_uid=header.study_uid,
            actor=calling_ae,
            sop_instance_uid=header.sop_instance_uid,
            version=version,
        )
    reopened = previous_status != StudyStatus.RECEIVING
    if reopened:
        add_event(
            db_session=connection,
            kind="study_reopened",
            study_uid=header.study_uid,
            actor=calling_ae,
            previous_status=str(previous_status),
            sop_instance_uid=header.sop_instance_uid,
        )
    return IndexResult(outcome, header.study_uid, reopened)
