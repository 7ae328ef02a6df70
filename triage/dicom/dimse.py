"""DIMSE command sets (PS3.7 chapter 9 and Annex E): read a request, write a response.

A command set is group 0000 only, always Implicit VR Little Endian. The listener needs a
handful of its elements, so they are read and written here directly, with every length
checked against the bytes received.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from triage.dicom.uids import uid_text
from triage.errors import DicomInputError

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF  # carries Message ID Being Responded To, not a Message ID (PS3.7 9.3.2.3)
RESPONSE_BIT = 0x8000
NO_DATASET = 0x0101
"""Command Data Set Type meaning "no data set follows"; any other value means one does."""

# Tags of group 0000 as (element number); the group is always 0.
_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS_UID = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
_COMMAND_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE_UID = 0x1000

_ELEMENT_HEADER = struct.Struct("<HHL")
_US = struct.Struct("<H")


@dataclass(frozen=True)
class Command:
    """The parts of a DIMSE request the listener acts on."""

    command_field: int
    message_id: int
    has_dataset: bool
    affected_sop_class_uid: str
    affected_sop_instance_uid: str


def _unsigned_short(elements: dict[int, bytes], element: int, name: str) -> int:
    value = elements.get(element)
    if value is None or len(value) != 2:
        raise DicomInputError(f"command set has no valid {name}")
    result: int = _US.unpack(value)[0]
    return result


def parse_command(data: bytes | bytearray) -> Command:
    """Read a request's command set. Raises DicomInputError when it is not one."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _ELEMENT_HEADER.size:
            raise DicomInputError("command set ends inside an element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0x0000:
            raise DicomInputError(f"command set holds an element of group {group:04X}")
        if length > end - offset:
            raise DicomInputError("command set element longer than the command set")
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    command_field = _unsigned_short(elements, _COMMAND_FIELD, "Command Field")
    cancel_without_id = command_field == C_CANCEL_RQ and _MESSAGE_ID not in elements
    return Command(
        command_field=command_field,
        message_id=0 if cancel_without_id else _unsigned_short(elements, _MESSAGE_ID, "Message ID"),
        has_dataset=_unsigned_short(elements, _COMMAND_DATA_SET_TYPE, "Command Data Set Type")
        != NO_DATASET,
        affected_sop_class_uid=uid_text(elements.get(_AFFECTED_SOP_CLASS_UID, b"")),
        affected_sop_instance_uid=uid_text(elements.get(_AFFECTED_SOP_INSTANCE_UID, b"")),
    )


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii", errors="replace")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


def _short_text(value: str) -> bytes:
    encoded = value.encode("ascii", errors="replace")[:64]
    return encoded + b" " if len(encoded) % 2 else encoded


def encode_response(request: Command, status: int, *, error_comment: str | None = None) -> bytes:
    """The response command set to ``request`` with ``status`` (no data set follows)."""
    elements = [_element(_AFFECTED_SOP_CLASS_UID, _uid(request.affected_sop_class_uid))]
    elements.append(_element(_COMMAND_FIELD, _US.pack(request.command_field | RESPONSE_BIT)))
    elements.append(_element(_MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(request.message_id)))
    elements.append(_element(_COMMAND_DATA_SET_TYPE, _US.pack(NO_DATASET)))
    elements.append(_element(_STATUS, _US.pack(status)))
    if error_comment:
        elements.append(_element(_ERROR_COMMENT, _short_text(error_comment)))
    if request.affected_sop_instance_uid:
        elements.append(
            _element(_AFFECTED_SOP_INSTANCE_UID, _uid(request.affected_sop_instance_uid))
        )
    body = b"".join(elements)
    return _element(_GROUP_LENGTH, struct.pack("<L", len(body))) + body
