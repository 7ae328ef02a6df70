"""The listener's DICOM upper layer driven byte by byte over loopback: negotiation results,
fragmentation, abandoned and broken associations, limits. Peers that behave are covered by
test_receiver.py (DCMTK, pynetdicom, Orthanc); these are the ones that do not."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from tests.conftest import IngestStack, StackFactory
from tests.helpers.dul import (
    A_ABORT,
    A_ASSOCIATE_AC_TYPE,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    RawAssociation,
    association_request,
    c_store_rq,
    command_set,
    pdu,
    pdv,
)
from tests.helpers.instances import dataset_body, dataset_bytes_of, pydicom_file
from tests.helpers.process import wait_for
from triage.config import Settings
from triage.db.models import AuditEvent, Instance
from triage.db.session import session_scope

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
# C-STORE statuses as PS3.4 B.2.3 numbers them (not the product's constants).
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
SUCCESS = 0x0000  # Success


@pytest.fixture
def stack(settings: Settings, stack_factory: StackFactory) -> IngestStack:
    stack = stack_factory(
        settings.model_copy(
            update={"allowed_callers": [], "max_associations": 2, "network_timeout_seconds": 5}
        )
    )
    stack.listener()
    return stack


def _port(stack: IngestStack) -> int:
    return stack.listeners[0].port


def _count(stack: IngestStack, model: type, *where: object) -> int:
    with session_scope(stack.session_factory) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _files(stack: IngestStack) -> list[Path]:
    """Every file in the spool but the empty ones the listener keeps ready in tmp/."""
    return [
        path
        for path in stack.spool.root.rglob("*")
        if path.is_file() and not (path.parent == stack.spool.tmp and path.stat().st_size == 0)
    ]


def _ct_small() -> tuple[bytes, str]:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    return dataset_body(ds), str(ds.SOPInstanceUID)


def _wait_active(stack: IngestStack, count: int) -> None:
    def active() -> float | None:
        return stack.registry.get_sample_value("triage_associations_active")

    wait_for(lambda: active() == count, timeout=5, what=f"{count} open associations")


def _associated(stack: IngestStack, *syntaxes: str) -> RawAssociation:
    peer = RawAssociation(_port(stack))
    assert peer.associate(list(syntaxes) or [CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    return peer


def _release(peer: RawAssociation) -> None:
    peer.send(pdu(A_RELEASE_RQ, bytes(4)))
    assert peer.read().pdu_type == A_RELEASE_RP
    peer.close()


def test_many_small_fragments_and_several_pdvs_per_pdu_make_one_instance(
    stack: IngestStack,
) -> None:
    body, sop_instance_uid = _ct_small()
    peer = _associated(stack)
    command = c_store_rq(1, CT_IMAGE_STORAGE, sop_instance_uid)
    # The command in two fragments, then the data set in 1000-byte fragments, five per PDU.
    items = [pdv(1, 0x01, command[:20]), pdv(1, 0x03, command[20:])]
    chunks = [body[start : start + 1000] for start in range(0, len(body), 1000)]
    items += [pdv(1, 0x02 if i == len(chunks) - 1 else 0x00, c) for i, c in enumerate(chunks)]
    for start in range(0, len(items), 5):
        peer.send(pdu(P_DATA_TF, b"".join(items[start : start + 5])))
    assert peer.response_status() == SUCCESS
    _release(peer)
    assert _count(stack, Instance) == 1
    [stored] = stack.spool.objects.glob("*/*.dcm")
    assert stored.read_bytes().endswith(body)
    assert dcmread(stored).file_meta.MediaStorageSOPInstanceUID == sop_instance_uid


def test_data_sets_of_any_size_in_turn_on_one_association_are_stored_exactly(
    stack: IngestStack,
) -> None:
    """Data sets are received in place into buffers reused from one C-STORE to the next: a
    large one (the buffer grows), a small one after it, one refused, one more after that."""
    rng = random.Random(7)
    ds = dcmread(pydicom_file("CT_small.dcm"))
    sent: dict[str, bytes] = {}
    peer = _associated(stack)
    for message_id, side in enumerate((1100, 128, 0, 300), start=1):
        if side == 0:  # refused before its data set is read: nothing may be left of it
            body, _ = _ct_small()
            peer.send(
                pdu(P_DATA_TF, pdv(1, 0x03, c_store_rq(message_id, CT_IMAGE_STORAGE, "1..2")))
            )
            peer.send(pdu(P_DATA_TF, pdv(1, 0x02, body)))
            assert peer.response_status() == CANNOT_UNDERSTAND
            continue
        ds.SOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = side
        ds.PixelData = rng.randbytes(side * side * 2)
        body = dataset_body(ds)
        sent[str(ds.SOPInstanceUID)] = body
        peer.send(
            pdu(
                P_DATA_TF, pdv(1, 0x03, c_store_rq(message_id, CT_IMAGE_STORAGE, ds.SOPInstanceUID))
            )
        )
        for start in range(0, len(body), 60_000):  # 60 kB PDUs
            last = start + 60_000 >= len(body)
            peer.send(pdu(P_DATA_TF, pdv(1, 0x02 if last else 0x00, body[start : start + 60_000])))
        assert peer.response_status() == SUCCESS
    _release(peer)
    with session_scope(stack.session_factory) as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.file_id)).all()
    assert {uid for uid, _ in rows} == set(sent)
    for uid, file_id in rows:
        assert dataset_bytes_of(stack.spool.path_for(file_id)) == sent[uid]


def test_pdus_that_arrive_together_are_taken_apart(stack: IngestStack) -> None:
    """Three C-STOREs and the release request in one write: the reader's early bytes (it takes
    a PDV header with each PDU header) must never swallow the start of the next PDU."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    stream = b""
    for message_id in (1, 2, 3):
        ds.SOPInstanceUID = generate_uid()
        command = c_store_rq(message_id, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
        stream += pdu(P_DATA_TF, pdv(1, 0x03, command) + pdv(1, 0x02, dataset_body(ds)))
    peer = _associated(stack)
    peer.send(stream + pdu(A_RELEASE_RQ, bytes(4)))
    assert [peer.response_status() for _ in range(3)] == [SUCCESS] * 3
    assert peer.read().pdu_type == A_RELEASE_RP
    peer.close()
    assert _count(stack, Instance) == 3


@pytest.mark.parametrize(("max_pdu", "accepted"), [(0, True), (16384, False)])
def test_pdu_size_limit_follows_the_announced_maximum(
    settings: Settings, stack_factory: StackFactory, max_pdu: int, accepted: bool
) -> None:
    stack = stack_factory(settings.model_copy(update={"max_pdu_bytes": max_pdu}))
    stack.listener()
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 400
    ds.PixelData = bytes(400 * 400 * 2)
    body, sop_instance_uid = dataset_body(ds), str(ds.SOPInstanceUID)  # one PDU of ~320 kB
    peer = _associated(stack)
    command = c_store_rq(1, CT_IMAGE_STORAGE, sop_instance_uid)
    peer.send(pdu(P_DATA_TF, pdv(1, 0x03, command) + pdv(1, 0x02, body)))
    if accepted:  # no maximum announced: any size is taken
        assert peer.response_status() == SUCCESS
        _release(peer)
        assert _count(stack, Instance) == 1
    else:
        assert peer.read().pdu_type == A_ABORT
        assert _count(stack, Instance) == 0


def test_no_announced_maximum_takes_a_pdu_of_any_length(
    settings: Settings, stack_factory: StackFactory
) -> None:
    """max_pdu_bytes = 0 announces no maximum (PS3.8 D.1): a 72 MiB P-DATA-TF is taken."""
    stack = stack_factory(settings.model_copy(update={"max_pdu_bytes": 0}))
    stack.listener()
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 6 * 1024, 6 * 1024
    ds.PixelData = random.Random(3).randbytes(6 * 1024 * 6 * 1024 * 2)
    body, sop_instance_uid = dataset_body(ds), str(ds.SOPInstanceUID)
    peer = _associated(stack)
    command = c_store_rq(1, CT_IMAGE_STORAGE, sop_instance_uid)
    peer.send(pdu(P_DATA_TF, pdv(1, 0x03, command) + pdv(1, 0x02, body)))
    assert peer.response_status() == SUCCESS
    _release(peer)
    [stored] = stack.spool.objects.glob("*/*.dcm")
    assert dataset_bytes_of(stored) == body


def test_open_associations_get_an_a_abort_when_triage_stops(stack: IngestStack) -> None:
    peer = _associated(stack)
    listener = stack.listeners[0]
    stopper = threading.Thread(target=listener.stop)
    stopper.start()
    _seconds, received = peer.until_closed(within=10)
    stopper.join()
    # A-ABORT (PS3.8 9.3.8): type 07, length 4, source 0 (service-user), reason 0.
    assert received == bytes.fromhex("07000000000400000000")


def test_association_aborted_mid_data_set_keeps_nothing(stack: IngestStack) -> None:
    body, sop_instance_uid = _ct_small()
    peer = _associated(stack)
    peer.send(pdu(P_DATA_TF, pdv(1, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, sop_instance_uid))))
    peer.send(pdu(P_DATA_TF, pdv(1, 0x00, body[: len(body) // 2])))
    peer.send(pdu(A_ABORT, bytes([0, 0, 0, 0])))
    peer.close()
    _wait_active(stack, 0)
    assert _count(stack, Instance) == 0
    assert _files(stack) == []


def test_connection_dropped_mid_data_set_keeps_nothing(stack: IngestStack) -> None:
    body, sop_instance_uid = _ct_small()
    peer = _associated(stack)
    peer.send(pdu(P_DATA_TF, pdv(1, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, sop_instance_uid))))
    peer.send(pdu(P_DATA_TF, pdv(1, 0x00, body[:5000])))
    peer.close()
    _wait_active(stack, 0)
    assert _count(stack, Instance) == 0
    assert _files(stack) == []


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(pdu(0x09, b"\x00" * 8), id="unknown-pdu-type"),
        pytest.param(pdu(P_DATA_TF, pdv(7, 0x03, b"\x00" * 8)), id="context-not-accepted"),
        pytest.param(pdu(P_DATA_TF, b"\x00\x00\x10\x00\x01\x03"), id="pdv-longer-than-pdu"),
        pytest.param(pdu(P_DATA_TF, pdv(1, 0x00, b"\x00" * 8)), id="data-before-command"),
        pytest.param(pdu(P_DATA_TF, pdv(1, 0x03, b"\x08\x00\x00\x00")), id="bad-command-set"),
        pytest.param(pdu(0x01, b"\x00" * 100), id="second-associate-rq"),
        pytest.param(b"\x04\x00\xff\xff\xff\xff", id="pdu-claims-4-gib"),
    ],
)
def test_protocol_errors_get_an_abort_and_the_listener_keeps_serving(
    stack: IngestStack, broken: bytes
) -> None:
    peer = _associated(stack)
    peer.send(broken)
    reply = peer.read()
    assert reply.pdu_type == A_ABORT
    assert reply.body[2] == 0x02  # source: service provider
    _seconds, after = peer.until_closed(within=3)  # closed, not left open
    assert after == b""
    wait_for(
        lambda: _count(stack, AuditEvent, AuditEvent.kind == "rejection") == 1,
        timeout=5,
        what="the abort recorded",
    )
    ae = AE(ae_title="AFTER")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", _port(stack), ae_title="TRIAGE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == SUCCESS
    assoc.release()


def test_release_in_the_middle_of_a_message_is_an_abort(stack: IngestStack) -> None:
    body, sop_instance_uid = _ct_small()
    peer = _associated(stack)
    peer.send(pdu(P_DATA_TF, pdv(1, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, sop_instance_uid))))
    peer.send(pdu(P_DATA_TF, pdv(1, 0x00, body[:1000])))
    peer.send(pdu(A_RELEASE_RQ, bytes(4)))
    assert peer.read().pdu_type == A_ABORT
    assert _count(stack, Instance) == 0


def test_store_on_another_classes_context_and_unknown_operations_are_refused(
    stack: IngestStack,
) -> None:
    body, sop_instance_uid = _ct_small()
    peer = _associated(stack, MR_IMAGE_STORAGE, VERIFICATION)
    # A CT instance on the MR context (id 1).
    peer.send(pdu(P_DATA_TF, pdv(1, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, sop_instance_uid))))
    peer.send(pdu(P_DATA_TF, pdv(1, 0x02, body)))
    assert peer.response_status() == 0x0122
    # An N-ACTION (no data set) on the verification context (id 3).
    action = command_set(
        RequestedSOPClassUID=VERIFICATION,
        CommandField=0x0130,
        MessageID=2,
        CommandDataSetType=0x0101,
        RequestedSOPInstanceUID="1.2.3",
    )
    peer.send(pdu(P_DATA_TF, pdv(3, 0x03, action)))
    assert peer.response_status() == 0x0211  # PS3.7 C.5.2: unrecognized operation
    # A C-STORE-RQ that says it carries no data set (PS3.7 9.3.1.1 requires one).
    empty_store = command_set(
        AffectedSOPClassUID=MR_IMAGE_STORAGE,
        CommandField=0x0001,
        MessageID=3,
        Priority=0,
        CommandDataSetType=0x0101,
        AffectedSOPInstanceUID="1.2.3.4",
    )
    peer.send(pdu(P_DATA_TF, pdv(1, 0x03, empty_store)))
    assert peer.response_status() == 0xC000  # PS3.4 B.2.3: Error, cannot understand
    _release(peer)
    assert _count(stack, Instance) == 0
    assert _files(stack) == []


def test_unsupported_sop_class_is_refused_at_negotiation(stack: IngestStack) -> None:
    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.3.4.5.6")  # no such storage class
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.4.999")  # unknown syntax
    ae.add_requested_context(CT_IMAGE_STORAGE)
    assoc = ae.associate("127.0.0.1", _port(stack), ae_title="TRIAGE")
    assert assoc.is_established
    results = {cx.context_id: cx.result for cx in assoc.rejected_contexts}
    assert results == {1: 0x03, 3: 0x04}  # abstract / transfer syntax not supported
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CT_IMAGE_STORAGE]
    assoc.release()


def test_associations_beyond_the_limit_are_rejected_as_transient(stack: IngestStack) -> None:
    held = [_associated(stack), _associated(stack)]  # max_associations = 2
    extra = RawAssociation(_port(stack))
    reply = extra.associate([CT_IMAGE_STORAGE])
    assert RawAssociation.rejection(reply) == (0x02, 0x03, 0x02)  # transient, local limit
    extra.close()
    _release(held.pop())
    _wait_active(stack, 1)
    again = _associated(stack)  # room again
    _release(again)
    _release(held.pop())
    wait_for(
        lambda: _count(stack, AuditEvent, AuditEvent.kind == "rejection") == 1,
        timeout=5,
        what="the rejection recorded",
    )


@pytest.mark.parametrize(
    ("calling", "called", "expected"),
    [
        ("RAWSCU", "SOMEONE", (0x01, 0x01, 0x07)),  # called AE title not recognised
        ("STRANGER", "TRIAGE", (0x01, 0x01, 0x03)),  # calling AE title not recognised
    ],
)
def test_association_rejection_reasons(
    settings: Settings,
    stack_factory: StackFactory,
    calling: str,
    called: str,
    expected: tuple[int, int, int],
) -> None:
    allowed = Settings(allowed_callers=["RAWSCU"]).allowed_callers
    stack = stack_factory(settings.model_copy(update={"allowed_callers": allowed}))
    listener = stack.listener()
    peer = RawAssociation(listener.port)
    assert (
        RawAssociation.rejection(peer.associate([CT_IMAGE_STORAGE], calling=calling, called=called))
        == expected
    )
    peer.close()


def test_idle_association_is_closed_after_the_network_timeout(
    settings: Settings, stack_factory: StackFactory
) -> None:
    stack = stack_factory(settings.model_copy(update={"network_timeout_seconds": 0.5}))
    listener = stack.listener()
    peer = RawAssociation(listener.port, timeout=5)
    assert peer.associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    started = time.monotonic()
    assert peer.read().pdu_type == A_ABORT
    assert time.monotonic() - started < 3
    _seconds, after = peer.until_closed(within=2)  # closed after its A-ABORT, not left open
    assert after == b""


def test_a_negotiation_is_remembered_by_its_request(stack: IngestStack) -> None:
    """The listener answers a request it has seen from memory; any other request, even one
    that differs only in the calling AE title, is negotiated on its own."""
    listener = stack.listeners[0]
    server = listener._server  # the AcceptorServer this listener runs
    assert server is not None
    ct = association_request([CT_IMAGE_STORAGE], calling="CT01")
    first = server.negotiation(ct)
    assert server.negotiation(ct) is first
    assert dict(first.abstract_syntaxes) == {1: CT_IMAGE_STORAGE}
    assert (first.calling_ae, first.refusal) == ("CT01", None)

    other = server.negotiation(
        association_request([MR_IMAGE_STORAGE, "1.2.3.4.5.6"], calling="MR01")
    )
    assert other is not first
    assert (other.calling_ae, dict(other.abstract_syntaxes)) == ("MR01", {1: MR_IMAGE_STORAGE})
    assert server.negotiation(ct) is first

    # And over the wire, twice with the same request: both accepted, with the same answer.
    replies = []
    for _ in range(2):
        peer = RawAssociation(_port(stack))
        replies.append(peer.associate([CT_IMAGE_STORAGE]))
        assert peer.accepted == {1: "1.2.840.10008.1.2.1"}
        _release(peer)
    assert replies[0] == replies[1]
