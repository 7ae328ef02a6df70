"""A-ASSOCIATE-RQ in, A-ASSOCIATE-AC out (PS3.8 9.3.2, 9.3.3; PS3.7 Annex D): decoded,
negotiated and encoded here, in one pass over the request's items.

A request is walked item by item with its sizes checked, and nothing in it is validated more
than negotiation needs: a transfer syntax UID we do not take is skipped, not parsed. A request
proposing more presentation contexts or transfer syntaxes than any real sender does is refused
before anything is built from it, so a hostile request costs about what a real one does (and
writes no log line per syntax).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

MAX_CONTEXTS = 128
"""Presentation context IDs are the odd numbers 1 to 255 (PS3.8 9.3.2.2)."""
MAX_SYNTAXES_PER_CONTEXT = 64
"""More transfer syntaxes than DICOM defines for one context is not a real request."""

# Item types (PS3.8 9.3.2, PS3.7 D.3.3)
_APPLICATION_CONTEXT = 0x10
_PRESENTATION_CONTEXT_RQ = 0x20
_PRESENTATION_CONTEXT_AC = 0x21
_ABSTRACT_SYNTAX = 0x30
_TRANSFER_SYNTAX = 0x40
_USER_INFORMATION = 0x50
_MAXIMUM_LENGTH = 0x51
_IMPLEMENTATION_CLASS_UID = 0x52
_IMPLEMENTATION_VERSION_NAME = 0x55
_USER_IDENTITY_RQ = 0x58
_USER_IDENTITY_AC = 0x59

# Presentation context results (PS3.8 9.3.3.2)
ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

_FIXED = struct.Struct(">HH16s16s32x")  # protocol version, reserved, called, calling
_ITEM = struct.Struct(">BxH")


class MalformedRequest(ValueError):
    """The A-ASSOCIATE-RQ cannot be decoded (answered with an A-ABORT)."""


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ's result, source and reason (PS3.8 9.3.4), and why, for the log."""

    result: int
    source: int
    reason: int
    why: str


NO_REASON_GIVEN = (0x01, 0x01, 0x01)  # also the answer to a user identity not accepted
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
APPLICATION_CONTEXT_NOT_SUPPORTED = (0x01, 0x01, 0x02)
PROTOCOL_VERSION_NOT_SUPPORTED = (0x01, 0x02, 0x02)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


def rejection(code: tuple[int, int, int], why: str) -> Rejection:
    return Rejection(*code, why=why)


@dataclass(frozen=True)
class UserIdentity:
    """The User Identity sub-item of an A-ASSOCIATE-RQ (PS3.7 D.3.3.7): type 1 a username,
    2 a username and passcode (others are kept as sent)."""

    kind: int
    primary: bytes
    secondary: bytes
    positive_response_requested: bool


@dataclass(frozen=True)
class AcceptorIdentity:
    """What we announce in an A-ASSOCIATE-AC."""

    max_pdu_bytes: int
    implementation_class_uid: str
    implementation_version_name: str
    identities_checked: bool = False
    """User identities are checked (a positive response is sent when one is requested)."""


@dataclass(frozen=True)
class Negotiation:
    """What an A-ASSOCIATE-RQ asks for and our answer, which depend on nothing else (whether
    the caller may associate is the policy's question, asked every time)."""

    calling_ae: str
    called_ae: str
    refusal: Rejection | None  # for the protocol version, application context or sizes
    transfer_syntaxes: Mapping[int, str]  # accepted presentation context id -> transfer syntax
    abstract_syntaxes: Mapping[int, str]  # accepted presentation context id -> SOP class
    peer_max_pdu: int
    identity: UserIdentity | None
    accept: bytes  # the A-ASSOCIATE-AC to send


def ae_titles(request: bytes) -> tuple[str, str]:
    """(calling, called) AE titles of an A-ASSOCIATE-RQ PDU, read from its fixed fields alone
    (so that a caller can be refused before its request is decoded)."""
    if len(request) < 6 + _FIXED.size:
        raise MalformedRequest("A-ASSOCIATE-RQ shorter than its fixed fields")
    _version, _reserved, called, calling = _FIXED.unpack_from(request, 6)
    return _title(calling), _title(called)


def _title(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def _items(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, start of value, end of value) of each item or sub-item in data[start:end]."""
    while start < end:
        if end - start < _ITEM.size:
            raise MalformedRequest("A-ASSOCIATE-RQ ends inside an item header")
        kind, length = _ITEM.unpack_from(data, start)
        start += _ITEM.size
        if length > end - start:
            raise MalformedRequest(f"item {kind:#04x} runs past its end")
        yield kind, start, start + length
        start += length


def negotiate(
    request: bytes, supported: Mapping[str, Iterable[str]], acceptor: AcceptorIdentity
) -> Negotiation:
    """Decode an A-ASSOCIATE-RQ PDU (header included) and answer it.

    ``supported`` maps each abstract syntax we take to its transfer syntaxes. In each context
    the first transfer syntax the sender proposed that we take is accepted, so that it sends
    what it holds as it holds it; Implicit VR Little Endian only when it offered nothing else
    we take. Raises MalformedRequest for a request that cannot be decoded.
    """
    calling, called = ae_titles(request)
    version = _FIXED.unpack_from(request, 6)[0]
    end = min(len(request), 6 + struct.unpack_from(">L", request, 2)[0])
    application_context = ""
    proposed: list[tuple[int, str, list[bytes]]] = []  # (id, abstract syntax, transfer syntaxes)
    peer_max_pdu = 0
    identity: UserIdentity | None = None
    refusal: Rejection | None = None
    for kind, start, stop in _items(request, 6 + _FIXED.size, end):
        if kind == _APPLICATION_CONTEXT:
            application_context = _uid(request[start:stop])
        elif kind == _PRESENTATION_CONTEXT_RQ:
            if len(proposed) == MAX_CONTEXTS:
                refusal = rejection(NO_REASON_GIVEN, f"more than {MAX_CONTEXTS} contexts")
                break
            if stop - start < 4:
                raise MalformedRequest("presentation context item too short")
            abstract = ""
            syntaxes: list[bytes] = []
            for sub, sub_start, sub_stop in _items(request, start + 4, stop):
                if sub == _ABSTRACT_SYNTAX:
                    abstract = _uid(request[sub_start:sub_stop])
                elif sub == _TRANSFER_SYNTAX:
                    syntaxes.append(request[sub_start:sub_stop])
            if len(syntaxes) > MAX_SYNTAXES_PER_CONTEXT:
                refusal = rejection(
                    NO_REASON_GIVEN, f"more than {MAX_SYNTAXES_PER_CONTEXT} syntaxes in a context"
                )
                break
            proposed.append((request[start], abstract, syntaxes))
        elif kind == _USER_INFORMATION:
            for sub, sub_start, sub_stop in _items(request, start, stop):
                if sub == _MAXIMUM_LENGTH and sub_stop - sub_start == 4:
                    peer_max_pdu = struct.unpack_from(">L", request, sub_start)[0]
                elif sub == _USER_IDENTITY_RQ:
                    identity = _user_identity(request[sub_start:sub_stop])
        # other items are not ours to read (PS3.8 9.3.1: unrecognised items are ignored)
    if refusal is None:
        if not version & 0x0001:
            refusal = rejection(PROTOCOL_VERSION_NOT_SUPPORTED, "protocol version not supported")
        elif application_context != APPLICATION_CONTEXT_NAME:
            refusal = rejection(APPLICATION_CONTEXT_NOT_SUPPORTED, "application context unknown")
    if len({context_id for context_id, _abstract, _syntaxes in proposed}) != len(proposed):
        raise MalformedRequest("presentation context IDs repeated")
    results: list[tuple[int, int, str]] = []  # (id, result, transfer syntax)
    for context_id, abstract, syntaxes in proposed:
        takes = supported.get(abstract)
        if takes is None:
            results.append((context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT_VR_LITTLE_ENDIAN))
            continue
        offered = [uid for uid in map(_uid, syntaxes) if uid in takes]
        chosen = next((uid for uid in offered if uid != IMPLICIT_VR_LITTLE_ENDIAN), None)
        chosen = chosen or (offered[0] if offered else None)
        if chosen is None:
            results.append((context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED, IMPLICIT_VR_LITTLE_ENDIAN))
        else:
            results.append((context_id, ACCEPTANCE, chosen))
    accepted = {cid: syntax for cid, result, syntax in results if result == ACCEPTANCE}
    abstracts = {cid: abstract for cid, abstract, _syntaxes in proposed if cid in accepted}
    return Negotiation(
        calling_ae=calling,
        called_ae=called,
        refusal=refusal,
        transfer_syntaxes=MappingProxyType(accepted),
        abstract_syntaxes=MappingProxyType(abstracts),
        peer_max_pdu=peer_max_pdu,
        identity=identity,
        accept=b"" if refusal else _accept(request, results, acceptor, identity),
    )


def _user_identity(value: bytes) -> UserIdentity:
    if len(value) < 4:
        raise MalformedRequest("user identity sub-item too short")
    kind, positive = value[0], value[1]
    primary_length = struct.unpack_from(">H", value, 2)[0]
    primary = value[4 : 4 + primary_length]
    rest = value[4 + primary_length :]
    if len(primary) != primary_length or len(rest) < 2:
        raise MalformedRequest("user identity sub-item runs past its end")
    secondary_length = struct.unpack_from(">H", rest)[0]
    secondary = rest[2 : 2 + secondary_length]
    if len(secondary) != secondary_length:
        raise MalformedRequest("user identity sub-item runs past its end")
    return UserIdentity(kind, primary, secondary, bool(positive))


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, len(value)) + value


def _accept(
    request: bytes,
    results: list[tuple[int, int, str]],
    acceptor: AcceptorIdentity,
    identity: UserIdentity | None,
) -> bytes:
    """The A-ASSOCIATE-AC PDU (PS3.8 9.3.3): the request's AE title fields as sent."""
    items = [_item(_APPLICATION_CONTEXT, APPLICATION_CONTEXT_NAME.encode())]
    for context_id, result, syntax in results:
        # A rejected context's transfer syntax is not significant (PS3.8 9.3.3.2).
        syntax_item = _item(_TRANSFER_SYNTAX, syntax.encode())
        items.append(
            _item(_PRESENTATION_CONTEXT_AC, bytes([context_id, 0, result, 0]) + syntax_item)
        )
    user = [
        _item(_MAXIMUM_LENGTH, struct.pack(">L", acceptor.max_pdu_bytes)),
        _item(_IMPLEMENTATION_CLASS_UID, acceptor.implementation_class_uid.encode()),
        _item(_IMPLEMENTATION_VERSION_NAME, acceptor.implementation_version_name.encode()),
    ]
    if acceptor.identities_checked and identity and identity.positive_response_requested:
        # Sent only with an association the policy accepted, identity checked (PS3.7
        # D.3.3.7.2: an empty server response for a username, with or without passcode).
        user.append(_item(_USER_IDENTITY_AC, struct.pack(">H", 0)))
    items.append(_item(_USER_INFORMATION, b"".join(user)))
    body = struct.pack(">HH", 0x0001, 0) + request[10:74] + b"".join(items)
    return struct.pack(">BxL", 0x02, len(body)) + body
