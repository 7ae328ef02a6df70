"""The HL7 channel: an ORU^R01 (v2.5.1) per notification, sent over MLLP to ``hl7_destination``.

The message (segments end with CR; UTF-8, declared in MSH-18)::

    MSH|^~\\&|TRIAGE|<sending facility>|<receiving app>|<receiving facility>|<created>||
        ORU^R01^ORU_R01|<control id>|P|2.5.1|||||||UNICODE UTF-8
    PID|1||<patient id>||<family>^<given>^<middle>^<suffix>^<prefix>
    OBR|1|<accession>|<accession>|AICRIT^AI critical finding^99TRIAGE|S||<created>|...
        |<accession> (OBR-18)|...|<created> (OBR-22)|||P (OBR-25)
    TQ1|1||||||||S^Stat^HL70485
    OBX|1|TX|FINDING^AI finding^99TRIAGE||<finding>: probability 0.97, volume 12.3 mL (model ..,
        analysis round ..)|||AA|||P|||<created>
    OBX|2|NM|PROBABILITY^AI probability^99TRIAGE||0.97||||||P|||<created>
    OBX|3|NM|VOLUME^Lesion volume^99TRIAGE||12.3|mL^milliliter^UCUM|||||P|||<created>
    OBX|4|TX|PRIORITY^Worklist priority^99TRIAGE||Worklist tier critical: <reason>||||||P|||..
    OBX|5|ST|STUDYUID^Study Instance UID^99TRIAGE||<study uid>||||||P|||<created>

The patient's ID and name are read from the study row at send time (the notification's payload
never holds them); a DICOM name ``Family^Given^Middle^Prefix^Suffix`` becomes the HL7 XPN order
(family, given, middle, suffix, prefix). Priority STAT is given in OBR-5 (kept in 2.5.1 for
backward compatibility, and what many RIS read) and in TQ1-9. Result status is P (preliminary):
an AI result is not a radiologist's report. The message control id (MSH-10) is derived from the
notification's dedup key, and MSH-7 from its creation time, so every retry sends the same bytes
and the RIS can deduplicate a resend.

Every value is escaped with python-hl7 (``|`` ``^`` ``~`` ``\\`` ``&`` become ``\\F\\`` ``\\S\\``
``\\R\\`` ``\\E\\`` ``\\T\\``); control characters become spaces, and non-ASCII text is sent as
UTF-8 rather than python-hl7's ``\\X..\\`` hex escapes, which cannot represent characters
beyond Latin-1.

ACK (original mode, MSA-1): AA (or CA) is sent. AE (or CE), "application error", is retried:
the receiver had a problem it may not have next time. AR (or CR), "application reject", fails
at once: the receiver refuses this message and would refuse the same bytes again. No ACK within
the timeout, an unreadable ACK, or one for another control id, is retried.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum

import hl7  # type: ignore[import-untyped]  # python-hl7 ships no type information

from triage.config import Settings
from triage.errors import DestinationUnavailableError, PermanentError, TriageError
from triage.notify.notifier import Outgoing, channel

SENDING_APPLICATION = "TRIAGE"
VERSION = "2.5.1"
CHARACTER_SET = "UNICODE UTF-8"
LOCAL_CODES = "99TRIAGE"  # HL7 reserves 99zzz for locally defined coding systems

# MLLP framing (HL7 v2 Transport Specification, MLLP release 2).
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
MAX_ACK_BYTES = 1024 * 1024

Value = str | Sequence[str] | None  # one value, or the components of one
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NON_ASCII = re.compile(r"([^\x00-\x7f]+)")
_ENCODING = hl7.Message()  # the default delimiters, |^~\&, that MSH-1 and MSH-2 declare


class AckCode(StrEnum):
    """HL7 table 0008."""

    APPLICATION_ACCEPT = "AA"
    APPLICATION_ERROR = "AE"
    APPLICATION_REJECT = "AR"
    COMMIT_ACCEPT = "CA"
    COMMIT_ERROR = "CE"
    COMMIT_REJECT = "CR"


ACCEPTED = frozenset({AckCode.APPLICATION_ACCEPT, AckCode.COMMIT_ACCEPT})
REJECTED = frozenset({AckCode.APPLICATION_REJECT, AckCode.COMMIT_REJECT})


class MllpError(TriageError):
    """The peer's answer is not an MLLP frame."""


def escape(text: str) -> str:
    """``text`` as an HL7 value: delimiters escaped, control characters as spaces."""
    parts = _NON_ASCII.split(_CONTROL.sub(" ", text))
    # split() with a group alternates ASCII runs (escaped) and non-ASCII runs (kept as UTF-8).
    return "".join(
        part if index % 2 else str(hl7.util.escape(_ENCODING, part))
        for index, part in enumerate(parts)
    )


def _field(value: Value) -> str:
    if value is None:
        return ""
    components = [value] if isinstance(value, str) else list(value)
    return "^".join(escape(component) for component in components).rstrip("^")


def _segment(name: str, fields: Mapping[int, Value]) -> str:
    """One segment from its fields by position; positions not given are empty."""
    first = 3 if name == "MSH" else 1  # MSH-1 and MSH-2 are the delimiters themselves
    values = [_field(fields.get(i)) for i in range(first, max(fields, default=0) + 1)]
    return "|".join(["MSH|^~\\&" if name == "MSH" else name, *values])


def hl7_timestamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def message_control_id(message: Outgoing) -> str:
    """20 characters, the same for every attempt at one notification."""
    digest = hashlib.sha256(message.dedup_key.encode()).hexdigest()[:14].upper()
    return SENDING_APPLICATION + digest


def person_name(dicom_name: str | None) -> tuple[str, ...] | None:
    """A DICOM PN (alphabetic group) as HL7 XPN components: family, given, middle, suffix,
    prefix."""
    if not dicom_name:
        return None
    parts = dicom_name.split("=")[0].split("^")
    family, given, middle, prefix = (parts + [""] * 4)[:4]
    suffix = "^".join(parts[4:])  # a name with more components keeps them, escaped
    return (family, given, middle, suffix, prefix)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _number(value: object) -> str:
    if not isinstance(value, int | float):
        return ""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def build_oru(settings: Settings, message: Outgoing) -> str:
    """The ORU^R01 for ``message`` in ER7, segments ended by CR."""
    payload = message.payload
    created = hl7_timestamp(message.created_at)
    accession = _text(payload.get("accession_number"))
    finding = _text(payload.get("finding")) or "critical finding"
    probability = _number(payload.get("probability"))
    volume = _number(payload.get("volume_ml"))
    summary = f"{finding}: probability {probability or 'unknown'}"
    if volume:
        summary += f", volume {volume} mL"
    summary += f" (model {_text(payload.get('model'))}, analysis round {payload.get('round')})"
    priority = f"Worklist tier {_text(payload.get('tier'))}: {_text(payload.get('reason'))}"

    observations: list[tuple[str, Value, str, Value, str | None]] = [
        ("TX", ("FINDING", "AI finding", LOCAL_CODES), summary, None, "AA"),
        ("NM", ("PROBABILITY", "AI probability", LOCAL_CODES), probability, None, None),
    ]
    if volume:
        millilitre = ("mL", "milliliter", "UCUM")
        observations.append(
            ("NM", ("VOLUME", "Lesion volume", LOCAL_CODES), volume, millilitre, None)
        )
    observations += [
        ("TX", ("PRIORITY", "Worklist priority", LOCAL_CODES), priority, None, None),
        ("ST", ("STUDYUID", "Study Instance UID", LOCAL_CODES), message.study_uid, None, None),
    ]
    segments = [
        _segment(
            "MSH",
            {
                3: SENDING_APPLICATION,
                4: settings.hl7_sending_facility,
                5: settings.hl7_receiving_application,
                6: settings.hl7_receiving_facility,
                7: created,
                9: ("ORU", "R01", "ORU_R01"),
                10: message_control_id(message),
                11: "P",
                12: VERSION,
                18: CHARACTER_SET,
            },
        ),
        _segment(
            "PID",
            {1: "1", 3: message.patient.patient_id, 5: person_name(message.patient.name)},
        ),
        _segment(
            "OBR",
            {
                1: "1",
                2: accession,
                3: accession,
                4: ("AICRIT", "AI critical finding", LOCAL_CODES),
                5: "S",
                7: created,
                18: accession,
                22: created,
                25: "P",
            },
        ),
        _segment("TQ1", {1: "1", 9: ("S", "Stat", "HL70485")}),
    ]
    for number, (value_type, code, value, units, flag) in enumerate(observations, start=1):
        segments.append(
            _segment(
                "OBX",
                {
                    1: str(number),
                    2: value_type,
                    3: code,
                    5: value,
                    6: units,
                    8: flag,  # AA: critically abnormal
                    11: "P",
                    14: created,
                },
            )
        )
    return "\r".join(segments) + "\r"


def parse_destination(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6 address]:port`` too); PermanentError if it is neither."""
    host, separator, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PermanentError(f"hl7_destination {value!r} is not host:port")
    return host, int(port)


def exchange(host: str, port: int, message: bytes, *, timeout: float) -> bytes:
    """Send one MLLP frame and return the payload of the first frame answered.

    ``timeout`` bounds the connection, and again the wait for the answer.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN)
        deadline = time.monotonic() + timeout
        received = bytearray()
        while (end := received.find(END_BLOCK + CARRIAGE_RETURN)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer within {timeout:g} s")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the peer closed the connection without answering")
            received += chunk
            if len(received) > MAX_ACK_BYTES:
                raise MllpError(f"answer longer than {MAX_ACK_BYTES} bytes")
    start = received.find(START_BLOCK, 0, end)
    if start < 0:
        raise MllpError("answer without an MLLP start block")
    return bytes(received[start + 1 : end])


def read_ack(answer: bytes, control_id: str) -> AckCode:
    """MSA-1 of the ACK to our message ``control_id``; DestinationUnavailableError if the
    answer is no such ACK."""
    try:
        ack = hl7.parse(answer.decode("utf-8", errors="replace"))
        code, acknowledged = str(ack["MSA.F1"]), str(ack["MSA.F2"])
    except (hl7.HL7Exception, KeyError, IndexError) as exc:
        raise DestinationUnavailableError(f"unreadable HL7 ACK: {type(exc).__name__}") from exc
    if acknowledged != control_id:
        raise DestinationUnavailableError(f"HL7 ACK is for message {acknowledged!r}")
    try:
        return AckCode(code)
    except ValueError:
        raise DestinationUnavailableError(f"HL7 ACK with unknown code {code!r}") from None


@channel("hl7", destination=lambda settings: settings.hl7_destination)
def send_hl7(settings: Settings, message: Outgoing, *, timeout: float) -> None:
    send_to(settings, settings.hl7_destination, message, timeout=timeout)


@channel(
    "escalation-hl7",
    destination=lambda settings: settings.escalation_hl7_destination,
    escalation=True,
)
def send_escalation_hl7(settings: Settings, message: Outgoing, *, timeout: float) -> None:
    """The same ORU^R01 to ``escalation_hl7_destination``, for an unacknowledged alert."""
    send_to(settings, settings.escalation_hl7_destination, message, timeout=timeout)


def send_to(settings: Settings, destination: str, message: Outgoing, *, timeout: float) -> None:
    host, port = parse_destination(destination)
    control_id = message_control_id(message)
    text = build_oru(settings, message)
    try:
        answer = exchange(host, port, text.encode(), timeout=timeout)
    except (OSError, MllpError) as exc:
        raise DestinationUnavailableError(f"HL7 to {host}:{port}: {exc!r}") from exc
    code = read_ack(answer, control_id)
    if code in ACCEPTED:
        return
    # The ACK's free text (MSA-3, ERR) is not kept: a RIS may quote patient data in it.
    described = f"HL7 ACK {code} for message {control_id}"
    if code in REJECTED:
        raise PermanentError(f"{described}: rejected")
    raise DestinationUnavailableError(f"{described}: application error, will retry")
