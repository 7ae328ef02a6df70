"""``triage-admin import`` and start-up reconciliation of the spool with the index."""

from __future__ import annotations

import json
import subprocess
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.fileset import FileSet
from sqlalchemy import func, select

from tests.conftest import StackFactory
from tests.helpers.instances import ct_study
from tests.helpers.process import run_admin
from triage.config import Settings
from triage.db.models import AuditEvent, Instance
from triage.db.session import create_db_engine, session_scope
from triage.domain import InstanceState
from triage.ingest.reconcile import Reconciliation, reconcile_spool
from triage.storage.spool import Spool, SpooledFile


def admin(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return run_admin(settings, *argv, timeout=120)


def test_import_folder_and_dicomdir(settings: Settings, tmp_path: Path) -> None:
    assert admin(settings, "db", "upgrade").returncode == 0
    folder = tmp_path / "incoming"
    ct_study(folder / "one", 4)
    ct_study(folder / "two", 3)
    (folder / "notes.txt").write_text("not DICOM")

    first = admin(settings, "import", str(folder), "--json", "--allow-rejects")
    assert first.returncode == 0, first.stderr
    counts = json.loads(first.stdout)["counts"]
    assert (counts["stored"], counts["rejected"], counts["duplicate"]) == (7, 1, 0)
    again = admin(settings, "import", str(folder), "--json", "--allow-rejects")
    counts = json.loads(again.stdout)["counts"]
    assert (counts["stored"], counts["rejected"], counts["duplicate"]) == (0, 1, 7)

    media = tmp_path / "media"
    fileset = FileSet()
    for path in ct_study(tmp_path / "for-media", 2).paths:
        fileset.add(path)
    fileset.write(media)
    from_dicomdir = admin(settings, "import", str(media / "DICOMDIR"), "--json")
    assert from_dicomdir.returncode == 0, from_dicomdir.stderr
    assert json.loads(from_dicomdir.stdout)["counts"]["stored"] == 2

    status = admin(settings, "status", "--json")
    assert json.loads(status.stdout)["instances"] == 9


def _spooled(spool: Spool, data: bytes) -> SpooledFile:
    """``data`` as a whole spool file with no index row."""
    incoming = spool.open()
    incoming.write(data)
    return incoming.commit()


def test_reconcile_adopts_quarantines_and_flags(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    stack = stack_factory(settings)
    factory, spool, ingestor = stack.session_factory, stack.spool, stack.ingestor
    sent = ct_study(tmp_path / "in", 3)
    stored = [ingestor.ingest(p.read_bytes(), calling_ae="X", source="test") for p in sent.paths]
    assert len(stored) == 3

    # A crash between fsync+rename and the index commit, or a power cut that takes the commit,
    # leaves a whole file without a row; its file meta names the caller, as the listener's do:
    orphan = dcmread(ct_study(tmp_path / "orphan", 1).paths[0])
    orphan.file_meta.SourceApplicationEntityTitle = "MODALITY7"
    encoded = BytesIO()
    orphan.save_as(encoded, enforce_file_format=True)
    orphan_copy = _spooled(spool, encoded.getvalue())
    # ...a crash mid-write leaves a partial file in tmp/:
    (spool.tmp / "deadbeef.part").write_bytes(b"partial")
    # ...and a damaged disk may leave an unreadable file, or lose one:
    junk = _spooled(spool, b"not a DICOM file at all")
    with session_scope(factory) as session:
        lost = session.scalars(select(Instance.file_id)).first()
    assert lost is not None
    spool.path_for(lost).unlink()

    result = reconcile_spool(ingestor=ingestor, session_factory=factory)
    assert result == Reconciliation(partial_removed=1, adopted=1, quarantined=1, missing=1)
    assert not spool.path_for(junk.file_id).exists()
    assert (spool.quarantine_dir / f"{junk.file_id}.dcm").exists()
    with session_scope(factory) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 4
        adopted = session.scalars(
            select(Instance).where(Instance.file_id == orphan_copy.file_id)
        ).one()
        assert adopted.state == InstanceState.STORED
        assert adopted.calling_ae == "MODALITY7"
        missing = session.scalars(select(Instance).where(Instance.file_id == lost)).one()
        assert missing.state == InstanceState.MISSING
        kinds = session.scalars(select(AuditEvent.kind)).all()
        assert sorted(kinds) == ["quarantine", "spool_missing"]
    # A second pass finds nothing more to do.
    assert reconcile_spool(ingestor=ingestor, session_factory=factory) == Reconciliation()


def test_import_refuses_an_empty_folder(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = admin(settings, "import", str(tmp_path / "empty"))
    assert result.returncode == 1
    assert "no files found" in result.stderr


def test_only_the_ingest_engine_commits_without_a_flush(tmp_path: Path) -> None:
    """Rows from the ingest path can be rebuilt from the spool; nothing else can."""
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    for rebuildable, synchronous in ((False, 2), (True, 1)):  # FULL, NORMAL
        engine = create_db_engine(url, rebuildable=rebuildable)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == synchronous
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()
