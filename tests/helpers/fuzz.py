"""A DICOM client for fuzzing the receiver: sessions of associations and messages, valid or
mutated, sent with chosen PDV, PDU and TCP boundaries; what came back; and a ledger of what
must (and must not) be stored.

The client is interactive, as real senders are: it sends one message and reads its answer
before the next, so every Success the receiver sent is seen. A mutated message is the last of
its association.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Literal

from pydicom import dcmread
from pydicom.uid import UID

from tests.helpers.dul import association_request, c_store_rq, command_set, pdu, pdv
from tests.helpers.instances import dataset_body, pydicom_file

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
P_DATA_TF, A_RELEASE_RQ, A_ABORT = 0x04, 0x05, 0x07
PEER_MAX_PDU = 131072  # what triage announces by default
REPLY_SECONDS = 3.0  # longer than the receiver's deadlines in the fuzz configuration

_TEMPLATE = dcmread(pydicom_file("CT_small.dcm"))


@dataclass(frozen=True)
class Mutation:
    """``flip``: XOR the byte at ``offset`` with ``value``; ``truncate``: cut at ``offset``;
    ``insert``: put ``value`` bytes of junk at ``offset`` (offsets modulo the length)."""

    kind: Literal["flip", "truncate", "insert"]
    offset: int
    value: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        at = self.offset % len(data)
        if self.kind == "flip":
            return data[:at] + bytes([data[at] ^ (self.value or 1)]) + data[at + 1 :]
        if self.kind == "truncate":
            return data[:at]
        return data[:at] + random.Random(self.offset).randbytes(self.value) + data[at:]


@dataclass(frozen=True)
class Echo:
    mutation: Mutation | None = None


@dataclass(frozen=True)
class Store:
    """A C-STORE of a small CT image (``side`` x ``side`` random pixels from ``seed``), its data
    set in fragments of ``fragment`` bytes, ``per_pdu`` PDVs to a PDU; ``body_mutation``
    changes the data set before it is fragmented (what is stored must then be the changed
    one), ``mutation`` the bytes on the wire."""

    side: int
    seed: int
    fragment: int
    per_pdu: int
    body_mutation: Mutation | None = None
    mutation: Mutation | None = None


@dataclass(frozen=True)
class Garbage:
    """A PDU of any type and content (a known type with a wrong body, or an unknown one)."""

    pdu_type: int
    body: bytes


Message = Echo | Store | Garbage


@dataclass(frozen=True)
class Session:
    calling: str
    called: str
    request_mutation: Mutation | None
    messages: list[Message]
    ending: Literal["release", "abort", "close", "half"]
    chunk: int  # TCP writes of at most this many bytes
    pause: bool  # a short sleep every 64 writes


def store_body(store: Store) -> tuple[str, bytes]:
    """(SOP Instance UID, data set) of a Store, as generated before any mutation."""
    rng = random.Random(store.seed)
    ds = _TEMPLATE.copy()
    ds.SOPInstanceUID = UID(f"2.25.{rng.getrandbits(120)}")
    ds.StudyInstanceUID = UID(f"2.25.{rng.getrandbits(120)}")
    ds.SeriesInstanceUID = UID(f"2.25.{rng.getrandbits(120)}")
    ds.Rows = ds.Columns = store.side
    ds.PixelData = rng.randbytes(store.side * store.side * 2)
    return str(ds.SOPInstanceUID), dataset_body(ds)


def _fragments(data: bytes, size: int, control: int, per_pdu: int) -> bytes:
    size = max(1, min(size, PEER_MAX_PDU - 6))
    pieces = [data[start : start + size] for start in range(0, len(data), size)] or [b""]
    items = [
        pdv(1, control | (0x02 if index == len(pieces) - 1 else 0x00), piece)
        for index, piece in enumerate(pieces)
    ]
    per_pdu = max(1, min(per_pdu, PEER_MAX_PDU // (size + 6)))
    return b"".join(
        pdu(P_DATA_TF, b"".join(items[start : start + per_pdu]))
        for start in range(0, len(items), per_pdu)
    )


def encode(message: Message, message_id: int) -> tuple[bytes, str | None, bytes | None]:
    """The message's bytes on the wire, and for a C-STORE its SOP Instance UID and data set."""
    if isinstance(message, Garbage):
        return pdu(message.pdu_type, message.body), None, None
    if isinstance(message, Echo):
        command = command_set(
            AffectedSOPClassUID=VERIFICATION,
            CommandField=0x0030,
            MessageID=message_id,
            CommandDataSetType=0x0101,
        )
        wire = pdu(P_DATA_TF, pdv(3, 0x03, command))
        return (message.mutation.apply(wire) if message.mutation else wire), None, None
    sop_instance_uid, body = store_body(message)
    if message.body_mutation is not None:
        body = message.body_mutation.apply(body)
    command = c_store_rq(message_id, CT_IMAGE_STORAGE, sop_instance_uid)
    wire = pdu(P_DATA_TF, pdv(1, 0x03, command)) + _fragments(
        body, message.fragment, 0x00, message.per_pdu
    )
    if message.mutation is not None:
        wire = message.mutation.apply(wire)
    return wire, sop_instance_uid, data_set_in(wire)


def data_set_in(wire: bytes) -> bytes | None:
    """The data set a receiver would take from ``wire`` (a command and its data set), or None
    where it holds no whole one."""
    offset, data, command_done = 0, b"", False
    while offset + 6 <= len(wire):
        pdu_type, length = struct.unpack_from(">BxL", wire, offset)
        end = offset + 6 + length
        if pdu_type != P_DATA_TF or end > len(wire):
            return None
        offset += 6
        while offset < end:
            if end - offset < 6:
                return None
            item_length, _context, control = struct.unpack_from(">LBB", wire, offset)
            if item_length < 2 or offset + 4 + item_length > end:
                return None
            value = wire[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if control & 0x01:
                command_done = bool(control & 0x02)
                continue
            if not command_done:
                return None
            data += value
            if control & 0x02:
                return data
    return None


@dataclass
class Answer:
    """What the receiver sent back for one message: a status, an abort, or nothing."""

    status: int | None = None
    responded_to: int | None = None
    aborted: bool = False
    closed: bool = False


class Connection:
    def __init__(self, port: int, session: Session) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_SECONDS)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.session = session
        self._received = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Write ``data`` in the session's chunks; False when the receiver closed."""
        step = max(1, self.session.chunk)
        try:
            for write, start in enumerate(range(0, len(data), step)):
                self.sock.sendall(data[start : start + step])
                if self.session.pause and write % 64 == 63:  # above the receiver's minimum rate
                    time.sleep(0.001)
        except OSError:
            return False
        return True

    def _fill(self, count: int, deadline: float) -> bool:
        while len(self._received) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except OSError:
                chunk = b""
            if not chunk:
                raise EOFError
            self._received += chunk
        return True

    def read_pdu(self, seconds: float = REPLY_SECONDS) -> tuple[int, bytes] | None:
        """The next PDU; None after ``seconds`` of waiting; EOFError when closed."""
        deadline = time.monotonic() + seconds
        if not self._fill(6, deadline):
            return None
        pdu_type, length = struct.unpack_from(">BxL", self._received)
        if not self._fill(6 + length, deadline):
            return None
        body = self._received[6 : 6 + length]
        self._received = self._received[6 + length :]
        return pdu_type, body

    def answer(self) -> Answer:
        command = b""
        try:
            while True:
                reply = self.read_pdu()
                if reply is None:
                    return Answer()
                pdu_type, body = reply
                if pdu_type == A_ABORT:
                    return Answer(aborted=True)
                if pdu_type != P_DATA_TF:
                    return Answer()
                offset = 0
                while offset + 6 <= len(body):
                    length, _context, control = struct.unpack_from(">LBB", body, offset)
                    command += body[offset + 6 : offset + 4 + length]
                    offset += 4 + length
                    if control & 0x02:
                        values = command_values(command)
                        return Answer(status=values.get(0x0900), responded_to=values.get(0x0120))
        except EOFError:
            return Answer(closed=True)


def command_values(command: bytes) -> dict[int, int]:
    """The US elements of an implicit VR little endian command set, by element number."""
    values, offset = {}, 0
    while offset + 8 <= len(command):
        _group, element, length = struct.unpack_from("<HHL", command, offset)
        if length == 2:
            values[element] = struct.unpack_from("<H", command, offset + 8)[0]
        offset += 8 + length
    return values


@dataclass
class Ledger:
    """What the receiver answered Success for: SOP Instance UID -> the SHA-256 digests of
    the data sets it may hold."""

    stored: dict[str, set[bytes]] = field(default_factory=dict)
    associations: int = 0
    accepted: int = 0
    messages: int = 0
    successes: int = 0
    aborts: int = 0

    def succeeded(self, sop_instance_uid: str, data_set: bytes) -> None:
        self.stored.setdefault(sop_instance_uid, set()).add(hashlib.sha256(data_set).digest())
        self.successes += 1


def run_session(port: int, session: Session, ledger: Ledger) -> None:
    """One association as the session says; every Success recorded in ``ledger``. Raises
    AssertionError where the receiver's answer breaks the protocol or a well-formed message
    is not served."""
    ledger.associations += 1
    connection = Connection(port, session)
    try:
        _run(connection, session, ledger)
    finally:
        connection.close()


def _run(connection: Connection, session: Session, ledger: Ledger) -> None:
    request = association_request(
        [CT_IMAGE_STORAGE, VERIFICATION], calling=session.calling, called=session.called
    )
    if session.request_mutation is not None:
        request = session.request_mutation.apply(request)
    if not connection.send(request):
        return
    try:
        reply = connection.read_pdu()
    except EOFError:
        return
    if session.request_mutation is None:  # well formed: accepted, or rejected for its title
        wanted = 0x02 if session.called == "TRIAGE" else 0x03
        assert reply is not None, "no answer to a valid request"
        assert reply[0] == wanted, f"a valid request got PDU type {reply[0]}"
    if reply is None or reply[0] != 0x02:  # rejected, aborted or no answer
        return
    ledger.accepted += 1
    for message_id, message in enumerate(session.messages, start=1):
        ledger.messages += 1
        wire, sop_instance_uid, data_set = encode(message, message_id)
        if not connection.send(wire):
            return
        answer = connection.answer()
        if answer.aborted or answer.closed:
            ledger.aborts += 1
        # After a mutated request (its contexts may differ from what we think we proposed) or
        # a mutated message, the receiver's answers are not ours to predict.
        mutated = (
            session.request_mutation is not None
            or isinstance(message, Garbage)
            or message.mutation is not None
        )
        if answer.status == 0x0000 and sop_instance_uid is not None:
            assert data_set is not None, "Success for a C-STORE whose data set was not whole"
            ledger.succeeded(sop_instance_uid, data_set)
        if not mutated:
            assert answer.responded_to == message_id, f"no answer to message {message_id}"
            if not (isinstance(message, Store) and message.body_mutation is not None):
                assert answer.status == 0x0000, f"status {answer.status} for a valid message"
        if mutated or answer.status is None:
            return  # the association's framing is not ours to predict after this
    _end(connection, session)


def _end(connection: Connection, session: Session) -> None:
    if session.ending == "release":
        if connection.send(pdu(A_RELEASE_RQ, bytes(4))):
            try:
                reply = connection.read_pdu()
            except EOFError:
                reply = None
            assert reply is not None, "no answer to an A-RELEASE-RQ"
            assert reply[0] == 0x06, "no A-RELEASE-RP"
    elif session.ending == "abort":
        connection.send(pdu(A_ABORT, bytes(4)))
    elif session.ending == "half":
        connection.send(pdu(P_DATA_TF, pdv(1, 0x03, b"\x00" * 40))[:20])
