"""Orthanc (Debian's, with its DICOMweb plugin) and ``triage serve`` as DICOMweb peers: Orthanc
stores a study into triage with its own STOW-RS client and retrieves one with its own WADO-RS
client, triage configured in Orthanc as a DICOMweb server (HTTP Basic: the token's name and
the token)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sqlalchemy import select

from tests.conftest import free_port
from tests.helpers import orthanc as peers
from tests.helpers.instances import ct_study, dataset_bytes_of
from tests.helpers.orthanc import OrthancFactory
from tests.helpers.process import VENV_BIN, create_token, port_open, running, wait_for
from triage.db.models import Instance, Job, Study
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.domain import StudyStatus

orthanc_factory = peers.orthanc_factory


def test_orthanc_stores_by_stow_rs_and_retrieves_by_wado_rs(
    tmp_path: Path, orthanc_factory: OrthancFactory
) -> None:
    data_dir, http_port = tmp_path / "triage", free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(free_port()),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_STUDY_QUIET_SECONDS": "600",
        "TRIAGE_ASSOCIATION_GRACE_SECONDS": "1",
        "TRIAGE_WORKERS": "0",
    }
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(http_port),
    ):
        sender = create_token(env, "orthanc-stow", "sender")
        reader = create_token(env, "orthanc-wado", "radiologist")
        url = f"http://127.0.0.1:{http_port}/dicom-web/"
        orthanc = orthanc_factory(
            extra_config={
                "DicomWeb": {
                    "Enable": True,
                    "Root": "/dicom-web/",
                    "Servers": {
                        "triage": {"Url": url, "Username": "orthanc-stow", "Password": sender},
                        "triage-read": {
                            "Url": url,
                            "Username": "orthanc-wado",
                            "Password": reader,
                        },
                    },
                }
            }
        )

        # Orthanc's STOW-RS client sends a study it holds.
        sent = ct_study(tmp_path / "sent", 4)
        orthanc.upload_all(sent.paths)
        orthanc_study = orthanc.find_study(sent.study_uid)
        assert orthanc_study is not None
        orthanc.request(
            "POST", "/dicom-web/servers/triage/stow", json={"Resources": [orthanc_study]}
        )
        engine = create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
        factory = make_session_factory(engine)

        def routed() -> bool:
            with session_scope(factory) as session:
                study = session.scalars(select(Study).where(Study.study_uid == sent.study_uid))
                row = study.one_or_none()
                if row is None or row.status is StudyStatus.RECEIVING:
                    return False
                jobs = session.scalars(select(Job.model_name).where(Job.study_id == row.id))
                return row.status is StudyStatus.ANALYZING and list(jobs) == [
                    "ct-head-hyperdensity"
                ]

        # Indexed, complete at the end of the request (grace 1 s), routed to the head CT model
        # like a C-STORE study (no worker runs here: the job waits queued).
        wait_for(routed, timeout=30, what="the STOW-RS study to complete and be routed")
        with session_scope(factory) as session:
            held = session.scalars(select(Instance.file_id)).all()
        assert len(held) == 4

        # Orthanc's WADO-RS client takes a study triage holds (one Orthanc never had).
        other = ct_study(tmp_path / "other", 3)
        for path in other.paths:
            subprocess.run(
                [str(VENV_BIN / "triage-admin"), "import", str(path)],
                env={"TRIAGE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
                check=True,
                capture_output=True,
                timeout=60,
            )
        orthanc.request(
            "POST",
            "/dicom-web/servers/triage-read/retrieve",
            json={"Resources": [{"Study": other.study_uid}]},
        )
        retrieved = orthanc.find_study(other.study_uid)
        assert retrieved is not None
        instances = orthanc.instances_of_study(retrieved)
        assert len(instances) == 3
        theirs = set()
        for instance in instances:
            file = tmp_path / f"{instance}.dcm"
            file.write_bytes(orthanc._client.get(f"/instances/{instance}/file").content)
            theirs.add(dataset_bytes_of(file))
        assert theirs == {dataset_bytes_of(path) for path in other.paths}
        engine.dispose()
