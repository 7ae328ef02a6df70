"""The acceptor side of the DICOM upper layer state machine (PS3.8 Table 9-10), state by
state and event by event: for each, the exact reply (PDU type, and for an A-ABORT its source
and reason) and when the connection ends.

States we can be in: awaiting the A-ASSOCIATE-RQ (Sta2); established (Sta6), idle, in the
middle of a command or of a data set; after the A-RELEASE-RP (Sta13). Events: every PDU type,
an unknown one, a truncated header or body, an oversized PDU, silence past each timer, the end
of the connection. Expected replies are the standard's actions (AE-6, AA-1, AA-2, AA-3, AA-8,
AR-2/AR-4, DT-2) with the PDU encodings of PS3.8 9.3, written here as numbers.
"""

from __future__ import annotations

import contextlib
import struct
import time
from dataclasses import dataclass

import pytest

from tests.conftest import StackFactory
from tests.helpers.dul import RawAssociation, association_request, c_store_rq, command_set, pdu, pdv
from triage.config import Settings

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
NETWORK_TIMEOUT = DIMSE_TIMEOUT = 1.0
ARTIM = 1.5

# PDU types (PS3.8 9.3.1)
RQ, AC, RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
# A-ABORT source and reason (PS3.8 9.3.8)
USER = (0x00, 0x00)  # service-user; reason not significant
UNEXPECTED = (0x02, 0x02)  # service-provider, unexpected PDU
UNRECOGNISED = (0x02, 0x01)  # service-provider, unrecognized PDU
INVALID_PARAMETER = (0x02, 0x06)  # service-provider, invalid PDU parameter value
NOT_SPECIFIED = (0x02, 0x00)  # service-provider, reason not specified

ECHO = command_set(
    AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=1, CommandDataSetType=0x0101
)
STORE = c_store_rq(1, CT_IMAGE_STORAGE, "1.2.3.4.5")


def request() -> bytes:
    return association_request([CT_IMAGE_STORAGE, VERIFICATION])  # context ids 1 and 3


EVENTS: dict[str, bytes | str] = {
    "A-ASSOCIATE-RQ": "request",
    "A-ASSOCIATE-AC": pdu(AC, bytes(68)),
    "A-ASSOCIATE-RJ": pdu(RJ, bytes(4)),
    "P-DATA-TF (C-ECHO)": pdu(P_DATA, pdv(3, 0x03, ECHO)),
    "P-DATA-TF (data set)": pdu(P_DATA, pdv(1, 0x02, bytes(100))),
    "P-DATA-TF (command)": pdu(P_DATA, pdv(3, 0x03, ECHO)),
    "A-RELEASE-RQ": pdu(RELEASE_RQ, bytes(4)),
    "A-RELEASE-RP": pdu(RELEASE_RP, bytes(4)),
    "A-ABORT": pdu(ABORT, bytes(4)),
    "unknown PDU type": pdu(0x08, bytes(4)),
    "truncated header": bytes([P_DATA, 0, 0]),
    "truncated body": "truncated body",
    "oversized P-DATA-TF": struct.pack(">BxL", P_DATA, 131072 + 4096) + bytes(64),
    "oversized A-ASSOCIATE-RQ": struct.pack(">BxL", RQ, 2 << 20) + bytes(64),
    "silence": "silence",
    "connection closed": "close",
}


@dataclass(frozen=True)
class Expect:
    reply: int | None  # the PDU type answered, None for nothing
    abort: tuple[int, int] | None = None  # its source and reason, for an A-ABORT
    closes: bool = True  # the connection ends after it
    after: float = 0.0  # not before this many seconds (a timer's)
    within: float = 1.0  # ...but within this many


def aborts(source_reason: tuple[int, int], after: float = 0.0) -> Expect:
    return Expect(ABORT, source_reason, after=after, within=after + 1.5)


def closes(after: float = 0.0) -> Expect:
    return Expect(None, after=after, within=after + 1.5)


# PS3.8 Table 9-10, acceptor side.
AWAITING_REQUEST = {
    "A-ASSOCIATE-RQ": Expect(AC, closes=False),  # AE-6
    "A-ASSOCIATE-AC": aborts(USER),  # AA-1
    "A-ASSOCIATE-RJ": aborts(USER),
    "P-DATA-TF (C-ECHO)": aborts(USER),
    "A-RELEASE-RQ": aborts(USER),
    "A-RELEASE-RP": aborts(USER),
    "A-ABORT": closes(),  # AA-2
    "unknown PDU type": aborts(USER),  # Evt19: AA-1
    "oversized A-ASSOCIATE-RQ": aborts(USER),
    "truncated header": closes(after=ARTIM),  # Evt18, ARTIM expired: AA-2
    "truncated body": closes(after=ARTIM),
    "silence": closes(after=ARTIM),
}
IDLE = {
    "A-ASSOCIATE-RQ": aborts(UNEXPECTED),  # AA-8
    "A-ASSOCIATE-AC": aborts(UNEXPECTED),
    "A-ASSOCIATE-RJ": aborts(UNEXPECTED),
    "P-DATA-TF (C-ECHO)": Expect(P_DATA, closes=False),  # DT-2, and the C-ECHO-RSP
    "P-DATA-TF (data set)": aborts(INVALID_PARAMETER),  # a data set with no command
    "A-RELEASE-RQ": Expect(RELEASE_RP),  # AR-2, AR-4; then the connection closes
    "A-RELEASE-RP": aborts(UNEXPECTED),
    "A-ABORT": closes(),  # AA-3
    "unknown PDU type": aborts(UNRECOGNISED),  # AA-8
    "oversized P-DATA-TF": aborts(INVALID_PARAMETER),
    "truncated header": aborts(NOT_SPECIFIED, after=NETWORK_TIMEOUT),
    "truncated body": aborts(NOT_SPECIFIED, after=NETWORK_TIMEOUT),
    "silence": aborts(NOT_SPECIFIED, after=NETWORK_TIMEOUT),
}
IN_A_MESSAGE = {
    "A-ASSOCIATE-RQ": aborts(UNEXPECTED),
    "A-RELEASE-RQ": aborts(UNEXPECTED),  # a release in the middle of a message
    "A-RELEASE-RP": aborts(UNEXPECTED),
    "A-ABORT": closes(),
    "unknown PDU type": aborts(UNRECOGNISED),
    "truncated body": aborts(NOT_SPECIFIED, after=DIMSE_TIMEOUT),
    "silence": aborts(NOT_SPECIFIED, after=DIMSE_TIMEOUT),
}
MID_COMMAND = {**IN_A_MESSAGE, "P-DATA-TF (data set)": aborts(INVALID_PARAMETER)}
MID_DATA_SET = {**IN_A_MESSAGE, "P-DATA-TF (command)": aborts(INVALID_PARAMETER)}
AFTER_RELEASE = {  # Sta13: we closed the connection after the A-RELEASE-RP
    "A-ASSOCIATE-RQ": closes(),
    "P-DATA-TF (C-ECHO)": closes(),
    "A-ABORT": closes(),
    "silence": closes(),
}
TABLE = {
    "awaiting the request": AWAITING_REQUEST,
    "idle": IDLE,
    "in the middle of a command": MID_COMMAND,
    "in the middle of a data set": MID_DATA_SET,
    "after the release response": AFTER_RELEASE,
}
# Every state meets the end of the connection the same way: we close too (AA-4, AA-5).
CASES = [
    (state, event, expect)
    for state, events in TABLE.items()
    for event, expect in [*events.items(), ("connection closed", closes())]
]


@pytest.fixture
def port(settings: Settings, stack_factory: StackFactory) -> int:
    stack = stack_factory(
        settings.model_copy(
            update={
                "allowed_callers": [],
                "network_timeout_seconds": NETWORK_TIMEOUT,
                "dimse_timeout_seconds": DIMSE_TIMEOUT,
                "acse_timeout_seconds": ARTIM,
            }
        )
    )
    return stack.listener().port


def truncated_body(state: str) -> bytes:
    """Half an A-ASSOCIATE-RQ while awaiting one; else a P-DATA-TF that says 100 bytes and
    stops after 36: its PDV a command fragment, or a data set fragment in the middle of a data
    set (each where the state takes one)."""
    if state == "awaiting the request":
        return request()[:100]
    context, control = (1, 0x00) if state == "in the middle of a data set" else (3, 0x01)
    return struct.pack(">BxL", P_DATA, 100) + struct.pack(">LBB", 94, context, control) + bytes(30)


def assert_serving(port: int) -> None:
    healthy = RawAssociation(port)
    assert healthy.associate([CT_IMAGE_STORAGE, VERIFICATION]).pdu_type == AC
    healthy.send(pdu(P_DATA, pdv(3, 0x03, ECHO)))
    assert healthy.response_status() == 0x0000
    healthy.close()


def into(state: str, port: int) -> RawAssociation:
    """A connection brought into ``state``."""
    peer = RawAssociation(port)
    if state == "awaiting the request":
        return peer
    assert peer.associate([CT_IMAGE_STORAGE, VERIFICATION]).pdu_type == AC
    if state == "in the middle of a command":
        peer.send(pdu(P_DATA, pdv(3, 0x01, ECHO[:20])))
    elif state == "in the middle of a data set":
        peer.send(pdu(P_DATA, pdv(1, 0x03, STORE) + pdv(1, 0x00, bytes(100))))
    elif state == "after the release response":
        peer.send(pdu(RELEASE_RQ, bytes(4)))
        assert peer.read().pdu_type == RELEASE_RP
    return peer


@pytest.mark.parametrize(
    ("state", "event", "expect"), CASES, ids=[f"{s}: {e}" for s, e, _ in CASES]
)
def test_state_table(port: int, state: str, event: str, expect: Expect) -> None:
    peer = into(state, port)
    stimulus = EVENTS[event]
    started = time.monotonic()
    try:
        if stimulus == "request":
            peer.send(request())
        elif stimulus == "truncated body":
            peer.send(truncated_body(state))
        elif stimulus == "close":
            peer.close()
            assert_serving(port)  # and the association's thread ended (see the gate)
            return
        elif isinstance(stimulus, bytes):
            peer.send(stimulus)
    except OSError:
        assert expect.reply is None, "the connection was closed before the event"
    if not expect.closes:
        assert peer.read().pdu_type == expect.reply
        peer.close()
        return
    seconds, received = peer.until_closed(within=expect.within + 1)
    assert expect.after - 0.2 <= seconds <= expect.within, f"ended after {seconds:.2f} s"
    if expect.reply is None:
        assert received == b""
    else:
        assert received[:1] == bytes([expect.reply]), received[:10].hex()
        if expect.abort is not None:
            # A-ABORT: type, reserved, length 4, reserved, reserved, source, reason.
            assert received == bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, *expect.abort])
    assert time.monotonic() - started < expect.within + 1


def test_the_listener_serves_on_after_every_case(port: int) -> None:
    for state, event, _expect in CASES:
        peer = into(state, port)
        stimulus = EVENTS[event]
        if isinstance(stimulus, bytes):
            with contextlib.suppress(OSError):
                peer.send(stimulus)
        peer.close()
    assert_serving(port)
