"""A real Orthanc auto-routes a study to a real ``triage serve``, as a hospital PACS would.

The study completes because Orthanc released its association (grace 1 s), long before the quiet
period (30 s) could complete it. A caller triage does not allow is refused at association and
nothing is indexed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.helpers import orthanc as peers
from tests.helpers.instances import ct_study
from tests.helpers.orthanc import OrthancError, OrthancFactory, OrthancPeer
from tests.helpers.process import VENV_BIN, port_open, running, wait_for
from triage.config import Settings

pytestmark = pytest.mark.slow

# The Orthanc fixtures, by name.
orthanc = peers.orthanc
orthanc_factory = peers.orthanc_factory

INSTANCES = 10
QUIET_SECONDS = 30
GRACE_SECONDS = 1
# After the association is released: the grace period, a watcher poll, a commit. Well below the
# quiet period, so only the released association can have completed the study in this time.
COMPLETION_TIMEOUT = 10.0


def serve_env(settings: Settings) -> dict[str, str]:
    return {
        "TRIAGE_DATA_DIR": str(settings.data_dir),
        "TRIAGE_DICOM_PORT": str(settings.dicom_port),
        "TRIAGE_HTTP_PORT": str(settings.http_port),
        "TRIAGE_STUDY_QUIET_SECONDS": str(QUIET_SECONDS),
        "TRIAGE_ASSOCIATION_GRACE_SECONDS": str(GRACE_SECONDS),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_ALLOWED_CALLERS": '["ORTHANC@127.0.0.1"]',
        # No routing rule: a complete study goes straight to "analyzed", whatever models exist.
        "TRIAGE_ROUTING_RULES": "[]",
    }


@contextmanager
def triage_serve(tmp_path: Path, env: Mapping[str, str], dicom_port: int) -> Iterator[None]:
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(dicom_port),
        timeout=60,
    ) as process:
        yield
        assert process.poll() is None, "triage serve died during the test"


def admin_status(env: Mapping[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [str(VENV_BIN / "triage-admin"), "status", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 3), done.stderr  # 3: unhealthy (e.g. no worker), counts given
    return dict(json.loads(done.stdout))


@pytest.fixture
def db(settings: Settings) -> Iterator[Engine]:
    """Read-only view of the SQLite database that ``triage serve`` writes."""
    engine = create_engine(f"sqlite:///{settings.data_dir / 'triage.sqlite'}")
    yield engine
    engine.dispose()


def study_rows(db: Engine) -> list[tuple[str, str]]:
    with db.connect() as connection:
        rows = connection.execute(text("SELECT study_uid, status FROM studies ORDER BY id"))
        return [(str(uid), str(status)) for uid, status in rows]


def completion_events(db: Engine, study_uid: str) -> list[dict[str, Any]]:
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT detail FROM audit_events WHERE kind = 'study_complete' "
                "AND study_uid = :uid ORDER BY id"
            ),
            {"uid": study_uid},
        )
        return [json.loads(detail) if isinstance(detail, str) else detail for (detail,) in rows]


def rejections(db: Engine) -> list[tuple[str | None, dict[str, Any]]]:
    with db.connect() as connection:
        rows = connection.execute(
            text("SELECT actor, detail FROM audit_events WHERE kind = 'rejection' ORDER BY id")
        )
        return [(actor, json.loads(d) if isinstance(d, str) else d) for actor, d in rows]


def test_orthanc_auto_routes_a_study_that_completes_on_release(
    tmp_path: Path, settings: Settings, orthanc: OrthancPeer, db: Engine
) -> None:
    env = serve_env(settings)
    study = ct_study(tmp_path / "ct", INSTANCES)
    with triage_serve(tmp_path, env, settings.dicom_port):
        orthanc.upload_all(study.paths)
        orthanc_study = orthanc.find_study(study.study_uid)
        assert orthanc_study is not None
        assert len(orthanc.instances_of_study(orthanc_study)) == INSTANCES

        report = orthanc.send_study_to("TRIAGE", orthanc_study)
        released = time.monotonic()
        assert report["InstancesCount"] == INSTANCES
        assert report["FailedInstancesCount"] == 0
        assert report["RemoteAet"] == "TRIAGE"

        # Success was owed only after the rows were committed: all are there already.
        assert admin_status(env)["instances"] == INSTANCES
        assert [uid for uid, _ in study_rows(db)] == [study.study_uid]

        def completed() -> bool:
            rows = study_rows(db)
            return bool(rows) and rows[0][1] != "receiving"

        wait_for(completed, timeout=COMPLETION_TIMEOUT, what="the study to complete")
        took = time.monotonic() - released

        ((uid, status),) = study_rows(db)
        assert uid == study.study_uid
        assert status == "analyzed"
        (event,) = completion_events(db, study.study_uid)
        assert event["reason"] == "association released"
        assert took < QUIET_SECONDS / 2
        assert admin_status(env)["instances"] == INSTANCES


def test_a_caller_triage_does_not_allow_is_refused(
    tmp_path: Path, settings: Settings, orthanc_factory: OrthancFactory, db: Engine
) -> None:
    env = serve_env(settings)
    stranger = orthanc_factory(
        aet="STRANGER", modalities={"TRIAGE": ("TRIAGE", "127.0.0.1", settings.dicom_port)}
    )
    study = ct_study(tmp_path / "ct", INSTANCES)
    with triage_serve(tmp_path, env, settings.dicom_port):
        stranger.upload_all(study.paths)
        orthanc_study = stranger.find_study(study.study_uid)
        assert orthanc_study is not None

        with pytest.raises(OrthancError) as refused:
            stranger.send_study_to("TRIAGE", orthanc_study)

        # Orthanc did reach triage, and triage refused the association.
        def refusal_recorded() -> bool:
            return any(actor == "STRANGER" for actor, _ in rejections(db))

        wait_for(refusal_recorded, timeout=5, what="triage to record the refusal")
        assert admin_status(env)["instances"] == 0
        assert study_rows(db) == []
    assert refused.value.status_code is not None
    assert refused.value.status_code >= 400
