"""A worker without the data directory (``worker_images = "dicomweb"``): ``triage serve`` on
PostgreSQL and Redis receives a study, a ``triage worker`` with its own empty data directory
fetches the series by WADO-RS, hands its SEG and SR back over HTTP, and delivers them to the
PACS (Orthanc) once."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tests.conftest import free_port
from tests.helpers import orthanc as peers
from tests.helpers.orthanc import OrthancFactory
from tests.helpers.phantoms import phantom_study
from tests.helpers.process import VENV_BIN, create_token, port_open, running, wait_for
from triage.db.models import Delivery, ResultObject
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.domain import WorkState

pytestmark = pytest.mark.slow

orthanc_factory = peers.orthanc_factory

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


def test_a_worker_without_the_data_directory_analyses_and_delivers_once(
    tmp_path: Path, postgres_url: str, redis_url: str, orthanc_factory: OrthancFactory
) -> None:
    pacs = orthanc_factory()
    http_port = free_port()
    shared = {
        "TRIAGE_DATABASE_URL": postgres_url,
        "TRIAGE_BROKER_URL": redis_url,
        "TRIAGE_DESTINATIONS": json.dumps([f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"]),
    }
    serve_env = {
        **shared,
        "TRIAGE_DATA_DIR": str(tmp_path / "serve"),
        "TRIAGE_DICOM_PORT": str(free_port()),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_STUDY_QUIET_SECONDS": "600",
        "TRIAGE_ASSOCIATION_GRACE_SECONDS": "1",
    }
    worker_dir = tmp_path / "worker"
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=serve_env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(http_port),
    ):
        sender = create_token(serve_env, "archive", "sender")
        worker_env = {
            **shared,
            "TRIAGE_DATA_DIR": str(worker_dir),
            "TRIAGE_WORKER_IMAGES": "dicomweb",
            "TRIAGE_SERVE_URL": f"http://127.0.0.1:{http_port}",
            "TRIAGE_WORKER_TOKEN": create_token(serve_env, "gpu-1", "worker"),
        }
        study = phantom_study(tmp_path / "study", 100_011, lesion=True)
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + path.read_bytes()
                + b"\r\n"
                for path in study.paths
            )
            + f"--{boundary}--\r\n".encode()
        )
        reply = httpx.post(
            f"http://127.0.0.1:{http_port}/dicom-web/studies",
            content=body,
            headers={
                "Authorization": f"Bearer {sender}",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text

        engine = create_db_engine(postgres_url)
        factory = make_session_factory(engine)

        def delivered() -> bool:
            with session_scope(factory) as session:
                states = session.scalars(select(Delivery.state)).all()
            return len(states) == 3 and all(state == WorkState.DONE for state in states)

        with running(
            [str(VENV_BIN / "triage"), "worker"], env=worker_env, log_file=tmp_path / "worker.log"
        ):
            wait_for(delivered, timeout=240, what="the SEG, SR and KOS delivered by the worker")

        # The PACS holds each result once.
        found: dict[str, str] = {}
        for instance in pacs.qido(f"studies/{study.study_uid}/instances"):
            sop_class = instance["00080016"]["Value"][0]
            if sop_class in (SEG, COMPREHENSIVE_3D_SR, KEY_OBJECT_SELECTION):
                found[instance["00080018"]["Value"][0]] = sop_class
        assert sorted(found.values()) == sorted([SEG, COMPREHENSIVE_3D_SR, KEY_OBJECT_SELECTION])
        # The result files are triage serve's; the worker kept no image and no result.
        with session_scope(factory) as session:
            file_ids = session.scalars(select(ResultObject.file_id)).all()
        for file_id in file_ids:
            assert (tmp_path / "serve" / "results" / f"{file_id}.dcm").is_file()
        # The key image too went to triage serve over HTTP.
        assert list((tmp_path / "serve" / "results" / "key-images").glob("*.png"))
        kept = [p for p in worker_dir.rglob("*.dcm")] if worker_dir.exists() else []
        assert not worker_dir.exists() or not list(worker_dir.rglob("*.png"))
        assert kept == []
        assert not (worker_dir / "spool").exists() or not any((worker_dir / "spool").rglob("*.dcm"))
        engine.dispose()
