"""Pulling from an archive that cannot push: a real Orthanc as a DICOMweb source (QIDO-RS, WADO-
RS) and as a DIMSE source (C-FIND, C-MOVE) of a real ``triage serve``. Studies added after the
poller started are retrieved and routed exactly once, across a restart of triage and an outage
of Orthanc."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from tests.conftest import free_port
from tests.helpers import orthanc as peers
from tests.helpers.instances import SentStudy, ct_study
from tests.helpers.orthanc import OrthancFactory, OrthancPeer
from tests.helpers.process import VENV_BIN, port_open, running, wait_for
from triage.db.models import Instance, Job, PulledStudy, Series, Study
from triage.db.session import SessionFactory, create_db_engine, make_session_factory, session_scope

pytestmark = pytest.mark.slow

orthanc_factory = peers.orthanc_factory

OUTAGE_SECONDS = 60.0


def admin(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "triage-admin"), *argv],
        env={**env, "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def instances_of(factory: SessionFactory, study_uid: str) -> int:
    with session_scope(factory) as session:
        return int(
            session.scalar(
                select(func.count(Instance.id))
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
                .where(Study.study_uid == study_uid)
            )
            or 0
        )


def jobs_of(factory: SessionFactory, study_uid: str) -> int:
    with session_scope(factory) as session:
        return int(
            session.scalar(
                select(func.count(Job.id))
                .join(Study, Job.study_id == Study.id)
                .where(Study.study_uid == study_uid)
            )
            or 0
        )


def todays_study(directory: Path, count: int) -> SentStudy:
    """A CT study dated today, as a new study in an archive is."""
    study = ct_study(directory, count)
    for path in study.paths:
        ds = dcmread(path)
        ds.StudyDate = datetime.now(UTC).strftime("%Y%m%d")
        ds.save_as(path, enforce_file_format=True)
    return study


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_new_studies_are_pulled_once_across_a_restart_and_an_outage(
    tmp_path: Path, orthanc_factory: OrthancFactory, kind: str
) -> None:
    data_dir, http_port, dicom_port = tmp_path / "triage", free_port(), free_port()
    # Over DIMSE the archive C-MOVEs to triage's AE title: it must know where that is.
    archive: OrthancPeer = orthanc_factory(
        modalities={"TRIAGE": ("TRIAGE", "127.0.0.1", dicom_port)}
    )
    target = (
        archive.dicomweb_url
        if kind == "dicomweb"
        else f"{archive.aet}@127.0.0.1:{archive.dicom_port}"
    )
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_STUDY_QUIET_SECONDS": "600",
        "TRIAGE_ASSOCIATION_GRACE_SECONDS": "1",
        "TRIAGE_WORKERS": "0",
        "TRIAGE_PULL_POLL_SECONDS": "1",
        "TRIAGE_RETRY_BACKOFF_SECONDS": "1",
        "TRIAGE_RETRY_BACKOFF_MAX_SECONDS": "4",
    }
    before = todays_study(tmp_path / "before", 2)  # in the archive before the source is added
    archive.upload_all(before.paths)

    @contextmanager
    def serve(log: str) -> Iterator[None]:
        with running(
            [str(VENV_BIN / "triage"), "serve"],
            env=env,
            log_file=tmp_path / log,
            ready=lambda: port_open(http_port),
        ):
            yield

    with serve("serve-1.log"):
        added = admin(env, "sources", "add", "archive", target, "--modality", "CT")
        assert added.returncode == 0, added.stderr
        engine = create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
        factory = make_session_factory(engine)
        first = todays_study(tmp_path / "first", 3)
        archive.upload_all(first.paths)
        wait_for(
            lambda: jobs_of(factory, first.study_uid) == 1,
            timeout=60,
            what="the first study pulled, complete and routed",
        )
        assert instances_of(factory, first.study_uid) == 3
        # It was there before the source was added, with today's date: found too.
        # (Routed before the stop: a study whose association ended just before a stop completes
        # after the quiet period instead, ten minutes here.)
        wait_for(lambda: jobs_of(factory, before.study_uid) == 1, timeout=30, what="before")

    # triage is down while a study arrives: found after the restart.
    second = todays_study(tmp_path / "second", 2)
    archive.upload_all(second.paths)
    with serve("serve-2.log"):
        wait_for(
            lambda: jobs_of(factory, second.study_uid) == 1,
            timeout=60,
            what="the study that arrived during the restart",
        )
        # The archive goes away for a minute: polling fails, says so, and backs off.
        archive.stop()
        stopped = time.monotonic()
        wait_for(
            lambda: "FAILING" in admin(env, "sources", "list").stdout,
            timeout=30,
            what="the source reported failing",
        )
        failing = admin(env, "sources", "list")
        assert failing.returncode == 1
        assert ("cannot reach the source" if kind == "dicomweb" else "refused or did not") in (
            failing.stdout
        )
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
        archive.start()
        third = todays_study(tmp_path / "third", 2)
        archive.upload_all(third.paths)
        wait_for(
            lambda: jobs_of(factory, third.study_uid) == 1,
            timeout=60,
            what="the study added after the outage",
        )
        assert admin(env, "sources", "list").returncode == 0

    # A poll by hand finds the same studies and retrieves none of them again.
    by_hand = admin(env, "sources", "poll", "archive")
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    assert "4 studies found, 0 retrieved" in by_hand.stdout

    # Exactly once: one pull record and one routing of each, no instance twice.
    with session_scope(factory) as session:
        pulled = session.scalars(select(PulledStudy.study_uid)).all()
    studies = [before, first, second, third]
    assert sorted(pulled) == sorted(study.study_uid for study in studies)
    for study in studies:
        assert jobs_of(factory, study.study_uid) == 1
        assert instances_of(factory, study.study_uid) == len(study.paths)
    engine.dispose()
