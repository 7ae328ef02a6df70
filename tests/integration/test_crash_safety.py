"""SIGKILL in the middle of a multi-association send loses no acknowledged instance."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import xxhash
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import func, select

from tests.conftest import free_port
from tests.helpers.instances import ct_study
from tests.helpers.process import VENV_BIN, port_open, running, wait_for
from triage.db.models import Instance
from triage.db.session import create_db_engine, make_session_factory, session_scope

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@contextmanager
def serve(data_dir: Path, dicom_port: int, log_file: Path, processes: int) -> Iterator[int]:
    env = {
        "TRIAGE_DICOM_PROCESSES": str(processes),
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTP_PORT": str(free_port()),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_STUDY_QUIET_SECONDS": "600",
    }
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=log_file,
        ready=lambda: port_open(dicom_port),
    ) as process:
        yield process.pid


def send(port: int, paths: list[Path], acked: set[str], lock: threading.Lock) -> None:
    """Send on one association, recording each Success; stop quietly when the peer dies."""
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if not assoc.is_established:
        return
    for path in paths:
        if not assoc.is_established:
            return
        reply = assoc.send_c_store(path)
        if reply and reply.get("Status") == 0x0000:
            with lock:
                acked.add(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    if assoc.is_established:
        assoc.release()


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "receiver-processes"])
def test_sigkill_mid_send_loses_no_acknowledged_instance(
    tmp_path: Path, data_dir: Path, processes: int
) -> None:
    port = free_port()
    series = [ct_study(tmp_path / f"s{i}", 60).paths for i in range(4)]
    uid_of = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for s in series for p in s}
    acked: set[str] = set()
    lock = threading.Lock()

    with serve(data_dir, port, tmp_path / "serve-1.log", processes) as pid:
        senders = [
            threading.Thread(target=send, args=(port, paths, acked, lock)) for paths in series
        ]
        for sender in senders:
            sender.start()
        wait_for(lambda: len(acked) >= 40, timeout=60, what="40 acknowledged instances")
        os.killpg(pid, signal.SIGKILL)
        for sender in senders:
            sender.join(timeout=60)
    acknowledged_before_crash = set(acked)
    assert 40 <= len(acknowledged_before_crash) < 240, "the kill did not land mid-send"

    with serve(data_dir, port, tmp_path / "serve-2.log", processes):
        for paths in series:
            unsent = [p for p in paths if uid_of[p] not in acked]
            send(port, unsent, acked, lock)
    assert acked == set(uid_of.values())

    engine = create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
    with session_scope(make_session_factory(engine)) as session:
        rows = session.scalars(select(Instance)).all()
        per_uid = dict(
            session.execute(
                select(Instance.sop_instance_uid, func.count()).group_by(Instance.sop_instance_uid)
            ).all()
        )
    engine.dispose()
    assert per_uid == dict.fromkeys(uid_of.values(), 1)  # every instance exactly once
    spool = data_dir / "spool" / "objects"
    for row in rows:
        data = (spool / row.file_id[:2] / f"{row.file_id}.dcm").read_bytes()
        assert row.digest == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    assert len(list(spool.glob("*/*.dcm"))) == len(rows)  # no stray files either
    assert [p for p in (data_dir / "spool" / "tmp").rglob("*") if p.is_file()] == []
