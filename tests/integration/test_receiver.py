"""The DICOM listener against real peers on loopback: DCMTK's echoscu/storescu and pynetdicom."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import func, select

from tests.conftest import StackFactory
from tests.helpers.instances import (
    SentStudy,
    ct_study,
    dataset_body,
    dataset_bytes_of,
    pydicom_file,
    raw_file,
)
from tests.helpers.process import wait_for
from triage.config import Settings, UserIdentity
from triage.db.models import AuditEvent, Instance, Study
from triage.db.session import SessionFactory, session_scope
from triage.domain import StudyStatus
from triage.ingest.completion import StudyCompletionWatcher
from triage.receiver.scp import DicomListener
from triage.sockets import set_nodelay
from triage.storage.spool import Spool

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# C-STORE statuses as PS3.4 B.2.3 numbers them (not the product's constants).
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
SUCCESS = 0x0000  # Success


@dataclass
class Receiver:
    """A stack's listener, with a completion watcher fed by its associations."""

    settings: Settings
    listener: DicomListener
    watcher: StudyCompletionWatcher
    spool: Spool
    session_factory: SessionFactory
    registry: CollectorRegistry

    @property
    def port(self) -> int:
        return self.listener.port

    def count(self, model: type, *where: object) -> int:
        with session_scope(self.session_factory) as session:
            return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    def study(self, study_uid: str) -> Study | None:
        with session_scope(self.session_factory) as session:
            return session.scalar(select(Study).where(Study.study_uid == study_uid))


@pytest.fixture
def receiver(settings: Settings, stack_factory: StackFactory) -> Receiver:
    # No routing rules: a complete study goes straight to "analyzed" (no model is needed here).
    settings = settings.model_copy(update={"allowed_callers": [], "routing_rules": []})
    stack = stack_factory(settings)
    watcher = StudyCompletionWatcher(settings, stack.session_factory)
    listener = stack.listener(on_association_end=watcher.association_ended)
    return Receiver(settings, listener, watcher, stack.spool, stack.session_factory, stack.registry)


def storescu(port: int, *paths: Path, calling: str = "STORESCU", called: str = "TRIAGE") -> int:
    result = subprocess.run(
        ["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, paths)],
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode


def send_files(port: int, *paths: Path, calling: str = "PYNETDICOM") -> list[int]:
    """Send files byte for byte with pynetdicom, one association; return each status.

    pynetdicom's chunked mode sends a file's dataset as it is on disk, never re-encoded.
    """
    ae = AE(ae_title=calling)
    pairs = set()
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        pairs.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE", evt_handlers=[])
    assert assoc.is_established
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        set_nodelay(type("E", (), {"assoc": assoc})())
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def test_echoscu(receiver: Receiver) -> None:
    result = subprocess.run(
        ["echoscu", "-aec", "TRIAGE", "127.0.0.1", str(receiver.port)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_storescu_series_is_spooled_and_indexed(receiver: Receiver, tmp_path: Path) -> None:
    sent = ct_study(tmp_path / "in", 12)
    assert storescu(receiver.port, *sent.paths) == 0
    assert receiver.count(Instance) == 12
    with session_scope(receiver.session_factory) as session:
        rows = session.scalars(select(Instance)).all()
        by_uid = {row.sop_instance_uid: row for row in rows}
    for path in sent.paths:
        original = dcmread(path)
        row = by_uid[original.SOPInstanceUID]
        stored = dcmread(receiver.spool.path_for(row.file_id))
        assert stored.PixelData == original.PixelData
        assert row.file_id not in str(original.SOPInstanceUID)
        assert row.transfer_syntax_uid == str(stored.file_meta.TransferSyntaxUID)
    study = receiver.study(sent.study_uid)
    assert study is not None
    assert study.status == StudyStatus.RECEIVING
    assert study.modalities == "CT"


def test_identical_resend_adds_nothing_and_changed_content_is_a_new_version(
    receiver: Receiver, tmp_path: Path
) -> None:
    sent = ct_study(tmp_path / "in", 3)
    assert storescu(receiver.port, *sent.paths) == 0
    assert storescu(receiver.port, *sent.paths) == 0
    # Through another AE title the stored files differ (the file meta names the sender), the
    # data sets do not.
    assert storescu(receiver.port, *sent.paths, calling="OTHER-PACS") == 0
    assert receiver.count(Instance) == 3
    assert len(list(receiver.spool.stored_ids())) == 3

    changed = dcmread(sent.paths[0])
    changed.WindowCenter = 123
    changed.save_as(sent.paths[0])
    assert send_files(receiver.port, sent.paths[0]) == [SUCCESS]
    assert receiver.count(Instance) == 4
    assert receiver.count(Instance, Instance.version == 2) == 1
    assert receiver.count(AuditEvent, AuditEvent.kind == "new_version") == 1


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",  # deflated explicit VR little endian
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPEG-LL.dcm",  # JPEG lossless
        "SC_rgb_rle.dcm",
    ],
)
def test_transfer_syntaxes_are_kept_as_sent(receiver: Receiver, name: str) -> None:
    path = pydicom_file(name)
    syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert send_files(receiver.port, path) == [SUCCESS]
    with session_scope(receiver.session_factory) as session:
        row = session.scalars(select(Instance)).one()
        file_id = row.file_id
        assert row.transfer_syntax_uid == syntax
    # The dataset is kept byte for byte as sent (compressed pixel data included).
    assert dataset_bytes_of(receiver.spool.path_for(file_id)) == dataset_bytes_of(path)


def _uid_dataset(sop_instance_uid: str) -> bytes:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = sop_instance_uid
    return dataset_body(ds)


def test_bad_input_gets_the_right_status(receiver: Receiver, tmp_path: Path) -> None:
    good = dcmread(pydicom_file("CT_small.dcm"))
    body = dataset_body(good)
    no_uids = good.copy()
    del no_uids.StudyInstanceUID
    cases = {
        "garbage": (b"\x13\x37" * 500, good.SOPInstanceUID, CANNOT_UNDERSTAND),
        "truncated": (body[: len(body) - 4000], good.SOPInstanceUID, CANNOT_UNDERSTAND),
        "wrong-length": (
            body[:200] + b"\xff\xff\x00\x7f" + body[204:],
            good.SOPInstanceUID,
            CANNOT_UNDERSTAND,
        ),
        "no-study-uid": (dataset_body(no_uids), good.SOPInstanceUID, CANNOT_UNDERSTAND),
        "traversal-uid": (
            _uid_dataset("../../etc/passwd"),
            "../../etc/passwd",
            CANNOT_UNDERSTAND,
        ),
        "other-instance": (body, "1.2.3.4.5", DATASET_DOES_NOT_MATCH_SOP_CLASS),
    }
    paths = []
    for name, (data, sop_uid, _) in cases.items():
        paths.append(
            raw_file(
                tmp_path / f"{name}.dcm",
                data,
                sop_class_uid=CT_IMAGE_STORAGE,
                sop_instance_uid=sop_uid,
            )
        )
    statuses = send_files(receiver.port, *paths)
    assert dict(zip(cases, statuses, strict=True)) == {
        name: expected for name, (_, _, expected) in cases.items()
    }
    assert receiver.count(Instance) == 0
    assert receiver.count(AuditEvent, AuditEvent.kind == "rejection") == len(cases)
    assert list(receiver.spool.stored_ids()) == []
    assert not any(receiver.settings.data_dir.parent.glob("etc*"))
    # Still serving:
    assert storescu(receiver.port, pydicom_file("CT_small.dcm")) == 0


def test_association_policy(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings = settings.model_copy(
        update={
            "allowed_callers": Settings(
                allowed_callers=["STORESCU@127.0.0.1", "ELSEWHERE@10.255.255.1"]
            ).allowed_callers
        }
    )
    stack = stack_factory(settings)
    listener = stack.listener()
    path = pydicom_file("CT_small.dcm")
    assert storescu(listener.port, path, calling="STORESCU") == 0
    assert storescu(listener.port, path, calling="STRANGER") != 0
    assert storescu(listener.port, path, calling="ELSEWHERE") != 0  # pinned to another host
    assert storescu(listener.port, path, calling="STORESCU", called="NOT_TRIAGE") != 0

    def rejected() -> list[str | None]:
        with session_scope(stack.session_factory) as session:
            return sorted(
                session.scalars(
                    select(AuditEvent.actor).where(AuditEvent.kind == "rejection")
                ).all()
            )

    # The rejection is recorded just after the peer is told; give it a moment.
    wait_for(lambda: len(rejected()) == 3, timeout=5, what="three recorded rejections")
    assert rejected() == ["ELSEWHERE", "STORESCU", "STRANGER"]


def _watch(receiver: Receiver) -> Iterator[None]:
    stopping = threading.Event()
    thread = threading.Thread(target=receiver.watcher.run, args=(stopping,), daemon=True)
    thread.start()
    yield
    stopping.set()
    thread.join()


def _wait_status(receiver: Receiver, uid: str, wanted: StudyStatus, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        study = receiver.study(uid)
        if study is not None and study.status == wanted:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"study not {wanted} after {timeout} s")


def test_completion_after_release_then_late_instance_reopens(
    receiver: Receiver, tmp_path: Path
) -> None:
    watching = _watch(receiver)
    next(watching)
    sent: SentStudy = ct_study(tmp_path / "a", 5)
    assert storescu(receiver.port, *sent.paths) == 0
    # grace 0.5 s, quiet 5 s: the released association completes the study well before the
    # quiet period could (_wait_status raises after 3 s)
    _wait_status(receiver, sent.study_uid, StudyStatus.ANALYZED, 3.0)
    late = ct_study(tmp_path / "b", 1, study_uid=sent.study_uid)
    assert storescu(receiver.port, *late.paths) == 0
    study = receiver.study(sent.study_uid)
    assert study is not None
    assert study.analysis_round == 1
    _wait_status(receiver, sent.study_uid, StudyStatus.ANALYZED, 3.0)
    study = receiver.study(sent.study_uid)
    assert study is not None
    assert study.analysis_round == 2
    assert receiver.count(AuditEvent, AuditEvent.kind == "study_reopened") == 1
    next(watching, None)


def test_dribbled_study_waits_for_the_quiet_period(receiver: Receiver, tmp_path: Path) -> None:
    """Instances sent one association at a time, with gaps shorter than the grace period,
    complete only once nothing has come for the grace period after the last release."""
    sent = ct_study(tmp_path / "a", 4)
    receiver.watcher.poll()
    for path in sent.paths:
        assert send_files(receiver.port, path) == [SUCCESS]
        assert receiver.watcher.poll() == []  # released just now: grace not yet over
    study = receiver.study(sent.study_uid)
    assert study is not None
    assert study.status == StudyStatus.RECEIVING
    time.sleep(0.6)
    assert receiver.watcher.poll() == [sent.study_uid]


def test_full_spool_answers_out_of_resources(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings = settings.model_copy(update={"spool_min_free_mb": 1 << 40})  # a petabyte reserve
    stack = stack_factory(settings)
    listener = stack.listener()
    path = pydicom_file("CT_small.dcm")
    assert send_files(listener.port, path, path) == [OUT_OF_RESOURCES] * 2
    rejected = stack.registry.get_sample_value(
        "triage_rejections_total", {"reason": "out-of-resources"}
    )
    assert rejected == 2.0
    with session_scope(stack.session_factory) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_metrics_count_instances_and_bytes(receiver: Receiver, tmp_path: Path) -> None:
    registry = receiver.registry
    sent = ct_study(tmp_path / "in", 5)
    assert storescu(receiver.port, *sent.paths) == 0
    assert registry.get_sample_value("triage_instances_received_total", {"source": "dimse"}) == 5
    size = sum(p.stat().st_size for p in sent.paths)
    received = registry.get_sample_value("triage_bytes_received_total")
    assert received is not None
    assert abs(received - size) < 5 * 512  # our file meta differs a little from storescu's
    assert registry.get_sample_value("triage_spool_seconds_count") == 5


IMPLICIT_LE = "1.2.840.10008.1.2"  # PS3.5 A.1
EXPLICIT_LE = "1.2.840.10008.1.2.1"  # PS3.5 A.2
DEFLATED_LE = "1.2.840.10008.1.2.1.99"  # PS3.5 A.5
EXPLICIT_BE = "1.2.840.10008.1.2.2"  # PS3.5 A.3
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"  # PS3.5 A.4.4


@pytest.mark.parametrize(
    ("proposed", "expected"),
    [
        # pynetdicom's default context: the sender would rather not send Implicit VR.
        ([IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE], EXPLICIT_LE),
        ([EXPLICIT_LE, IMPLICIT_LE], EXPLICIT_LE),
        # A sender holding JPEG 2000 keeps it compressed.
        ([JPEG2000_LOSSLESS, EXPLICIT_LE, IMPLICIT_LE], JPEG2000_LOSSLESS),
        ([IMPLICIT_LE], IMPLICIT_LE),
        (["1.2.3.4.5.6.7", EXPLICIT_BE, IMPLICIT_LE], EXPLICIT_BE),  # an unknown one skipped
    ],
)
def test_each_context_takes_the_syntax_the_sender_proposed_first(
    receiver: Receiver, proposed: list[str], expected: str
) -> None:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", proposed)  # CT Image Storage
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        (context,) = assoc.accepted_contexts
        assert context.transfer_syntax[0] == expected
    finally:
        assoc.release()


def test_user_identity_is_checked_when_configured(
    settings: Settings, stack_factory: StackFactory
) -> None:
    settings = settings.model_copy(
        update={
            "routing_rules": [],
            "user_identities": [
                UserIdentity(ae_title="STORESCU", username="alice", passcode=SecretStr("s3cret"))
            ],
        }
    )
    listener = stack_factory(settings).listener()
    path = pydicom_file("CT_small.dcm")

    def send(*identity: str, calling: str = "STORESCU") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["storescu", "-aet", calling, "-aec", "TRIAGE", *identity,
             "127.0.0.1", str(listener.port), str(path)],
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    # The right username and passcode, a positive response asked for and given.
    good = send("--user", "alice", "--password", "s3cret", "--pos-response")
    assert good.returncode == 0, good.stdout + good.stderr
    # A wrong passcode, or none at all: rejected at association.
    wrong = send("--user", "alice", "--password", "guess", "--pos-response")
    assert wrong.returncode != 0
    assert "Association Rejected" in wrong.stdout + wrong.stderr
    assert send().returncode != 0
    # A calling AE with no identity configured is not asked for one.
    assert send(calling="OTHER").returncode == 0


def test_a_c_cancel_gets_no_answer_and_the_association_goes_on(receiver: Receiver) -> None:
    """PS3.7 9.3.2.3: C-CANCEL-RQ has no response; nothing is running for it to cancel here."""
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        (context,) = assoc.accepted_contexts
        assoc.send_c_cancel(1, context.context_id)
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.is_established
    finally:
        assoc.release()
