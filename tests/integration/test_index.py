"""The index rows of received instances, on SQLite and on PostgreSQL: the ingest path runs its
statements on the DBAPI cursor (triage.db.prepared), so each backend's driver is exercised."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from tests.conftest import StackFactory
from tests.helpers.instances import ct_study
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import AuditEvent, Instance, Series, Study
from triage.db.prepared import Prepared
from triage.db.session import session_scope
from triage.dicom.header import data_set_offset
from triage.dicom.part10 import file_meta
from triage.domain import IndexOutcome, InstanceState, StudyStatus
from triage.storage.spool import content_digest


def test_rows_duplicates_versions_and_reopening(
    settings: Settings, database_url: str, tmp_path: Path, stack_factory: StackFactory
) -> None:
    stack = stack_factory(settings.model_copy(update={"database_url": database_url}))
    sent = ct_study(tmp_path / "in", 2)
    before = utcnow()
    first = [
        stack.ingestor.ingest(p.read_bytes(), calling_ae="CT01", source="test") for p in sent.paths
    ]
    assert [i.result.outcome for i in first] == [IndexOutcome.STORED] * 2

    with session_scope(stack.session_factory) as session:
        study = session.scalars(select(Study)).one()
        assert study.study_uid == sent.study_uid
        assert study.status == StudyStatus.RECEIVING
        assert study.modalities == "CT"
        assert study.patient_name is not None  # filled in from the header
        assert before <= study.last_received_at <= utcnow()
        assert study.updated_at >= before
        series = session.scalars(select(Series)).one()
        assert (series.series_uid, series.body_part) == (sent.series_uid, "HEAD")
        rows = session.scalars(select(Instance).order_by(Instance.instance_number)).all()
        assert [r.instance_number for r in rows] == [1, 2]
        assert {(r.state, r.version, r.calling_ae, r.series_id) for r in rows} == {
            (InstanceState.STORED, 1, "CT01", series.id)
        }
        assert all(before <= r.received_at <= utcnow() for r in rows)
        study_id = study.id

    # The same bytes again: a duplicate, nothing added.
    again = stack.ingestor.ingest(sent.paths[0].read_bytes(), calling_ae="CT01", source="test")
    assert again.result.outcome is IndexOutcome.DUPLICATE

    # Completed, then other content under the same SOP Instance UID: a new version that
    # re-opens the study, both recorded.
    with session_scope(stack.session_factory) as session:
        session.execute(
            update(Study).where(Study.id == study_id).values(status=StudyStatus.COMPLETE)
        )
    changed = dcmread(sent.paths[1])
    changed.SeriesDescription = "re-sent with another description"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path, enforce_file_format=True)
    late = stack.ingestor.ingest(changed_path.read_bytes(), calling_ae="CT02", source="test")
    assert late.result.outcome is IndexOutcome.NEW_VERSION
    assert late.result.reopened

    with session_scope(stack.session_factory) as session:
        study = session.scalars(select(Study)).one()
        assert study.status == StudyStatus.RECEIVING
        assert study.status_reason == "late instance after completion"
        versions = session.execute(
            select(Instance.version, Instance.calling_ae)
            .where(Instance.sop_instance_uid == str(changed.SOPInstanceUID))
            .order_by(Instance.version)
        ).all()
        assert [tuple(v) for v in versions] == [(1, "CT01"), (2, "CT02")]
        kinds = sorted(session.scalars(select(AuditEvent.kind)))
        assert kinds == ["new_version", "study_reopened"]


def test_a_resend_is_told_apart_by_its_data_set_byte_for_byte(
    settings: Settings, database_url: str, tmp_path: Path, stack_factory: StackFactory
) -> None:
    """The same data set behind another file meta (another sender, another implementation) is a
    duplicate; one other byte of pixel data, the size unchanged, is a new version."""
    stack = stack_factory(settings.model_copy(update={"database_url": database_url}))
    sent = ct_study(tmp_path / "in", 1)
    original = sent.paths[0].read_bytes()
    first = stack.ingestor.ingest(original, calling_ae="CT01", source="test")
    assert first.result.outcome is IndexOutcome.STORED
    header = first.header

    data_set = original[data_set_offset(original) :]
    rewrapped = (
        file_meta(
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            implementation_class_uid="1.2.3.4",
            implementation_version_name="OTHER_1",
            source_ae_title="OTHER-PACS",
        )
        + data_set
    )
    assert rewrapped != original
    again = stack.ingestor.ingest(rewrapped, calling_ae="OTHER-PACS", source="test")
    assert again.result.outcome is IndexOutcome.DUPLICATE

    altered = bytearray(original)
    altered[-1] ^= 0xFF  # the last pixel byte: same size, other content
    changed = stack.ingestor.ingest(bytes(altered), calling_ae="CT01", source="test")
    assert changed.result.outcome is IndexOutcome.NEW_VERSION
    with session_scope(stack.session_factory) as session:
        held = session.execute(
            select(Instance.version, Instance.digest, Instance.file_id)
            .where(Instance.sop_instance_uid == header.sop_instance_uid)
            .order_by(Instance.version)
        ).all()
    assert [version for version, _digest, _file in held] == [1, 2]
    assert [digest for _version, digest, _file in held] == [
        content_digest(original),
        content_digest(altered),
    ]
    assert stack.spool.path_for(held[1][2]).read_bytes() == altered
    assert len(list(stack.spool.objects.glob("*/*.dcm"))) == 2  # the duplicate was not kept


def test_a_failing_prepared_statement_raises_sqlalchemys_error_without_the_values(
    engine: Engine,
) -> None:
    statement = Prepared(insert(AuditEvent))
    values = {"at": utcnow(), "actor": "DOE^JANE", "study_uid": None, "detail": {"n": 1}}
    with engine.begin() as connection:
        statement.run(connection, {**values, "kind": "check"})
    with pytest.raises(KeyError, match="kinds"), engine.begin() as connection:
        statement.run(connection, {**values, "kinds": "misspelt"})  # not dropped in silence
    with pytest.raises(IntegrityError) as raised, engine.begin() as connection:
        statement.run(connection, {**values, "kind": None})  # kind is NOT NULL
    # SQLAlchemy leaves the values out (PostgreSQL's own DETAIL may still echo the failing row:
    # the ingest path logs exception types, never their text).
    assert "SQL parameters hidden" in str(raised.value)
    with engine.connect() as connection:
        stored = connection.execute(select(AuditEvent.kind, AuditEvent.detail)).all()
    assert [tuple(row) for row in stored] == [("check", {"n": 1})]
