"""A DICOM upper-layer client that sends exactly the bytes a test wants, on a real socket.

Association PDUs are encoded by pynetdicom and command sets by pydicom; the P-DATA-TF PDUs
(how data sets are fragmented, broken, or abandoned) are built here by hand.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"

A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE = 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item; control bit 0 = command, bit 1 = last fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def command_set(**elements: object) -> bytes:
    """A command set (group 0000, Implicit VR Little Endian) with its group length."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    encoded = body.getvalue()
    return struct.pack("<HHLL", 0, 0, 4, len(encoded)) + encoded


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    return command_set(
        AffectedSOPClassUID=sop_class_uid,
        CommandField=0x0001,
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000,
        AffectedSOPInstanceUID=sop_instance_uid,
    )


def association_request(
    abstract_syntaxes: list[str],
    *,
    calling: str = "RAWSCU",
    called: str = "TRIAGE",
    transfer_syntax: str = EXPLICIT_LITTLE,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one context per abstract syntax (ids 1, 3, 5, ...)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = []
    for index, abstract_syntax in enumerate(abstract_syntaxes):
        context = PresentationContext()
        context.context_id = 2 * index + 1
        context.abstract_syntax = UID(abstract_syntax)
        context.transfer_syntax = [UID(transfer_syntax)]
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())


@dataclass
class Reply:
    pdu_type: int
    body: bytes


class RawAssociation:
    """One connection to ``port``; ``associate()`` negotiates, the rest is up to the test."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted: dict[int, str] = {}  # context id -> transfer syntax

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
        return data

    def read(self) -> Reply:
        pdu_type, length = struct.unpack(">BxL", self._exactly(6))
        return Reply(pdu_type, self._exactly(length))

    def until_closed(self, within: float) -> tuple[float, bytes]:
        """Seconds until the peer ends the connection, and every byte it sent before that;
        AssertionError when the connection is still open after ``within`` seconds."""
        started = time.monotonic()
        received = b""
        while True:
            left = within - (time.monotonic() - started)
            if left <= 0:
                raise AssertionError(f"connection still open after {within} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                continue
            if not chunk:
                return time.monotonic() - started, received
            received += chunk

    def associate(
        self,
        abstract_syntaxes: list[str],
        *,
        calling: str = "RAWSCU",
        called: str = "TRIAGE",
        transfer_syntax: str = EXPLICIT_LITTLE,
    ) -> Reply:
        """Propose one context per abstract syntax (ids 1, 3, 5, ...); the AC or RJ reply."""
        self.send(
            association_request(
                abstract_syntaxes, calling=calling, called=called, transfer_syntax=transfer_syntax
            )
        )
        reply = self.read()
        if reply.pdu_type == A_ASSOCIATE_AC_TYPE:
            accept = A_ASSOCIATE_AC()
            accept.decode(pdu(reply.pdu_type, reply.body))
            for result in accept.to_primitive().presentation_context_definition_results_list:
                if result.result == 0 and result.context_id is not None:
                    self.accepted[result.context_id] = str(result.transfer_syntax[0])
        return reply

    @staticmethod
    def rejection(reply: Reply) -> tuple[int, int, int]:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        assert reply.pdu_type == A_ASSOCIATE_RJ_TYPE, reply.pdu_type
        rejected = A_ASSOCIATE_RJ()
        rejected.decode(pdu(reply.pdu_type, reply.body))
        return rejected.result, rejected.source, rejected.reason_diagnostic

    def response_status(self) -> int:
        """Read P-DATA-TF PDUs until a whole command set arrives; its Status."""
        command = b""
        while True:
            reply = self.read()
            assert reply.pdu_type == P_DATA_TF, f"expected P-DATA-TF, got {reply.pdu_type}"
            offset = 0
            while offset < len(reply.body):
                length, _context, control = struct.unpack_from(">LBB", reply.body, offset)
                command += reply.body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x02:
                    return _status_of(command)


def _status_of(command: bytes) -> int:
    offset = 0
    while offset < len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        if (group, element) == (0x0000, 0x0900):
            value: int = struct.unpack_from("<H", command, offset + 8)[0]
            return value
        offset += 8 + length
    raise AssertionError("response without a Status")
