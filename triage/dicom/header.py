"""Read what the index needs from an encoded instance, without decoding its pixels.

A received instance is checked for structure (every element fits in the bytes received) and for
the identifying UIDs; anything else is left as it came. The elements are walked here directly
(pydicom's reader builds an object per element, five times the cost); pydicom decodes the few
values the index keeps, in the data set's character set.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import IS
from pydicom.values import convert_PN, convert_string, convert_text

from triage.dicom.uids import is_valid_uid, uid_text
from triage.errors import DicomInputError

UNDEFINED_LENGTH = 0xFFFFFFFF

Bytes = bytes | bytearray | memoryview


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes triage indexes. Patient attributes are stored, never logged."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    order_priority: str | None = None
    expected_instances: int | None = None
    source_ae: str | None = None
    """Source AE Title of the file meta: who sent it (triage writes the calling AE there)."""


# The elements the index reads, with the VR they are read as (the dictionary's: a file may
# send them as UN, and implicit VR files carry no VR at all).
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


_WANTED: dict[int, tuple[str, str]] = {
    _tag(keyword): (keyword, dictionary_VR(keyword))
    for keyword in (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "BodyPartExamined",
        "StudyDescription",
        "SeriesDescription",
        "SeriesNumber",
        "InstanceNumber",
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
        "RequestedProcedurePriority",
        "ScheduledProcedureStepPriority",
        "NumberOfStudyRelatedInstances",
    )
}
_REQUEST_ATTRIBUTES = _tag("RequestAttributesSequence")
_REQUESTED_PRIORITY = _tag("RequestedProcedurePriority")
_NESTED_PRIORITY = 1 << 32 | _REQUESTED_PRIORITY
"""Where the walk keeps the first Requested Procedure Priority found inside the sequence's items
(a key no element tag can have)."""
_TRANSFER_SYNTAX = 0x00020010
_SOURCE_AE = 0x00020016

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN"}
    | {b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


class _Walker:
    """Walks encoded elements checking that every one fits, keeping the values asked for.

    Top-level elements with a defined length are skipped by their length (their contents,
    pixel data included, are never read); sequences and encapsulated pixel data of undefined
    length are walked item by item to find their end.
    """

    def __init__(self, data: Bytes, *, little: bool, keep: Container[int]) -> None:
        self.data = data
        self.keep = keep
        order = "<" if little else ">"
        self._implicit = struct.Struct(order + "HHL")  # tag, 32-bit length
        self._explicit = struct.Struct(order + "HH2sH")  # tag, VR, 16-bit length
        self._tag = struct.Struct(order + "HH")
        self._u32 = struct.Struct(order + "L")

    def _truncated(self, what: str) -> DicomInputError:
        return DicomInputError(f"data ends inside {what}")

    def elements(
        self,
        offset: int,
        end: int,
        *,
        implicit: bool,
        wanted: dict[int, bytes] | None,
        in_item: bool = False,
        only_group: int | None = None,
    ) -> int:
        """Walk a data set from ``offset``; the offset after it (after its Item Delimitation
        Item when ``in_item``). ``only_group`` stops at the first element of another group."""
        data, keep = self.data, self.keep
        header = (self._implicit if implicit else self._explicit).unpack_from
        u32 = self._u32.unpack_from
        # Most elements of an explicit VR data set have a short VR: the inner loop takes runs
        # of them as the loop below would, and leaves every other element to it.
        short_runs = not implicit and wanted is not None and only_group is None
        while offset < end:  # once per element: kept lean
            if short_runs:
                while end - offset >= 8:
                    group, element, vr, length = header(data, offset)
                    tag = group << 16 | element
                    if vr not in _SHORT_VRS or group == 0xFFFE or tag == _REQUEST_ATTRIBUTES:
                        break
                    start = offset + 8
                    if length > end - start:
                        raise DicomInputError(
                            f"element ({group:04X},{element:04X}) declares {length} bytes "
                            "past the end"
                        )
                    if tag in keep and tag not in wanted:  # type: ignore[operator]
                        wanted[tag] = bytes(data[start : start + length])  # type: ignore[index]
                    offset = start + length
                if offset >= end:
                    break
            if end - offset < 8:
                raise self._truncated("an element header")
            if implicit:
                group, element, length = header(data, offset)
                vr = b""
            else:
                group, element, vr, length = header(data, offset)
            start = offset + 8
            if group != only_group and only_group is not None:
                return offset
            if group == 0xFFFE:  # item tags have no VR
                if element == ITEM_END & 0xFFFF and in_item:
                    return start
                raise DicomInputError(f"unexpected item tag ({group:04X},{element:04X})")
            if vr in _LONG_VRS:
                if end - offset < 12:
                    raise self._truncated("an element header")
                length = u32(data, offset + 8)[0]
                start = offset + 12
            elif vr not in _SHORT_VRS and not (implicit or (vr.isalpha() and vr.isupper())):
                raise DicomInputError(f"element ({group:04X},{element:04X}) has no valid VR")
            tag = group << 16 | element
            nested = wanted if tag == _REQUEST_ATTRIBUTES and wanted is not None else None
            if length == UNDEFINED_LENGTH:
                offset = self.items(
                    start, end, implicit=implicit or vr == b"UN", wanted=nested, defined=False
                )
                continue
            if length > end - start:
                raise DicomInputError(
                    f"element ({group:04X},{element:04X}) declares {length} bytes past the end"
                )
            if tag in keep and wanted is not None and tag not in wanted:
                wanted[tag] = bytes(data[start : start + length])
            if nested is not None and length:
                self.items(
                    start,
                    start + length,
                    implicit=implicit or vr == b"UN",
                    wanted=nested,
                    defined=True,
                )
            offset = start + length
        if in_item:
            raise self._truncated("an item of undefined length")
        return offset

    def items(
        self,
        offset: int,
        end: int,
        *,
        implicit: bool,
        wanted: dict[int, bytes] | None,
        defined: bool,
    ) -> int:
        """Walk a sequence's items (or encapsulated fragments); the offset after the sequence.

        Items' data sets are searched for Requested Procedure Priority when ``wanted`` is given.
        """
        data = self.data
        while not defined or offset < end:
            if end - offset < 8:
                raise self._truncated("a sequence")
            group, element = self._tag.unpack_from(data, offset)
            tag = group << 16 | element
            length = self._u32.unpack_from(data, offset + 4)[0]
            offset += 8
            if tag == SEQUENCE_END and not defined:
                return offset
            if tag != ITEM:
                raise DicomInputError(f"expected an item, found ({group:04X},{element:04X})")
            inner: dict[int, bytes] | None = {} if wanted is not None else None
            if length == UNDEFINED_LENGTH:
                offset = self.elements(offset, end, implicit=implicit, wanted=inner, in_item=True)
            else:
                if length > end - offset:
                    raise self._truncated("an item")
                if inner is not None:
                    self.elements(offset, offset + length, implicit=implicit, wanted=inner)
                offset += length
            if wanted is not None and inner and _REQUESTED_PRIORITY in inner:
                wanted.setdefault(_NESTED_PRIORITY, inner[_REQUESTED_PRIORITY])
        return offset


_META_KEPT = frozenset({_TRANSFER_SYNTAX, _SOURCE_AE})


def _file_meta(data: Bytes) -> tuple[int, dict[int, bytes]]:
    """The offset of the data set after the preamble and File Meta Information, and the raw
    Transfer Syntax UID and Source AE Title found there. Raises DicomInputError."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DicomInputError("no DICOM preamble")
    meta: dict[int, bytes] = {}
    offset = _Walker(data, little=True, keep=_META_KEPT).elements(
        132, len(data), implicit=False, wanted=meta, only_group=0x0002
    )
    return offset, meta


def data_set_offset(data: Bytes) -> int:
    """Where the data set of a DICOM file starts (0 when it has no preamble or its File Meta
    Information cannot be walked)."""
    try:
        return _file_meta(data)[0]
    except (DicomInputError, struct.error):
        return 0


MAX_INFLATED_BYTES = 256 << 20
"""A deflated data set is read inflated, in memory, up to this size (Deflated Explicit VR
Little Endian carries structured reports and the like, not images)."""


@functools.lru_cache(maxsize=64)
def _encoding(syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a transfer syntax; an unknown one is read as explicit
    VR little endian, as every transfer syntax defined since is (pydicom's UID validates
    itself on every construction, hence the cache)."""
    known = UID(syntax)
    if not known.is_transfer_syntax:
        return False, True
    return known.is_implicit_VR, known.is_little_endian


def _scan(data: Bytes) -> tuple[str, dict[int, bytes]]:
    """The transfer syntax and the raw values of ``_WANTED`` and of the Source AE Title, after
    checking the structure."""
    offset, meta = _file_meta(data)
    if _TRANSFER_SYNTAX not in meta:  # the only meta element the index needs
        raise DicomInputError("file meta information has no Transfer Syntax UID")
    syntax = uid_text(meta[_TRANSFER_SYNTAX])
    body, start = data, offset
    if syntax == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body, start = inflater.decompress(data[offset:], MAX_INFLATED_BYTES), 0
        except zlib.error as exc:
            raise DicomInputError("deflated data set does not inflate") from exc
        if inflater.unconsumed_tail:
            raise DicomInputError(f"deflated data set inflates beyond {MAX_INFLATED_BYTES} bytes")
    implicit, little = _encoding(syntax)
    vr = bytes(body[start + 4 : start + 6])
    if not implicit and len(vr) == 2 and not (vr.isalpha() and vr.isupper()):
        implicit = True  # written implicit despite the meta (pydicom reads these the same way)
    found = {_SOURCE_AE: meta[_SOURCE_AE]} if _SOURCE_AE in meta else {}
    _Walker(body, little=little, keep=_WANTED).elements(
        start, len(body), implicit=implicit, wanted=found
    )
    return syntax, found


_TAGS = {keyword: tag for tag, (keyword, _vr) in _WANTED.items()}
_SPECIFIC_CHARACTER_SET = _TAGS["SpecificCharacterSet"]


class _Values:
    """Raw values read as pydicom would, in the data set's character set."""

    def __init__(self, raw: dict[int, bytes]) -> None:
        self.raw = raw
        charset = raw.get(_SPECIFIC_CHARACTER_SET)
        names = convert_string(charset, True) if charset else None
        self.encodings = convert_encodings(
            list(names) if isinstance(names, MultiValue) else names or None
        )

    def text(self, keyword: str, limit: int) -> str | None:
        tag = _TAGS[keyword]
        raw = self.raw.get(tag)
        if not raw:
            return None
        if raw.isascii() and b"\\" not in raw and b"\x1b" not in raw:
            # One value in ASCII, which every character set DICOM allows reads the same
            # (ESC would switch an ISO 2022 set): what pydicom makes of it, without pydicom.
            return raw.decode("ascii").rstrip("\x00 ").strip()[:limit] or None
        vr = _WANTED[tag][1]
        if vr == "PN":
            value: Any = convert_PN(raw, self.encodings)
        elif vr in ("SH", "LO", "UC", "ST", "LT", "UT"):
            value = convert_text(raw, self.encodings)
        else:
            value = convert_string(raw, True)
        return str(value).strip()[:limit] or None

    def integer(self, keyword: str) -> int | None:
        value = self.text(keyword, 64)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            try:
                return int(IS(value))
            except (TypeError, ValueError):
                return None

    def uid(self, keyword: str) -> str | None:
        raw = self.raw.get(_TAGS[keyword])
        return uid_text(raw) if raw is not None else None

    def source_ae(self) -> str | None:
        raw = self.raw.get(_SOURCE_AE)
        return raw.decode("ascii", "replace").strip(" \0")[:16] or None if raw else None

    def order_priority(self) -> str | None:
        """Requested Procedure Priority, else Scheduled Procedure Step Priority, else the
        Requested Procedure Priority in the Request Attributes Sequence."""
        for keyword in ("RequestedProcedurePriority", "ScheduledProcedureStepPriority"):
            if value := self.text(keyword, 16):
                return value.upper()
        nested = self.raw.get(_NESTED_PRIORITY)
        if nested:
            value = str(convert_string(nested, True)).strip()[:16]
            return value.upper() or None
        return None


def parse_header(data: Bytes) -> InstanceHeader:
    """The index attributes of a DICOM file held in ``data`` (preamble and file meta included).

    Every element must fit in the bytes received (pydicom reads a short value without
    complaint, so a truncated send would otherwise pass), and the identifying UIDs must be
    valid. Raises DicomInputError otherwise.
    """
    try:
        syntax, raw = _scan(data)
        values = _Values(raw)
    except DicomInputError:
        raise
    except Exception as exc:  # struct, codecs and pydicom raise many kinds on malformed input
        raise DicomInputError(f"unparseable dataset: {type(exc).__name__}") from exc
    uids = {
        "sop_class_uid": values.uid("SOPClassUID"),
        "sop_instance_uid": values.uid("SOPInstanceUID"),
        "study_uid": values.uid("StudyInstanceUID"),
        "series_uid": values.uid("SeriesInstanceUID"),
        "transfer_syntax_uid": syntax,
    }
    for name, value in uids.items():
        if value is None or not is_valid_uid(value):
            raise DicomInputError(f"missing or invalid {name}")
    try:
        return InstanceHeader(
            **{name: str(value) for name, value in uids.items()},
            modality=values.text("Modality", 16),
            body_part=values.text("BodyPartExamined", 16),
            study_description=values.text("StudyDescription", 64),
            series_description=values.text("SeriesDescription", 64),
            series_number=values.integer("SeriesNumber"),
            instance_number=values.integer("InstanceNumber"),
            patient_name=values.text("PatientName", 324),
            patient_id=values.text("PatientID", 64),
            accession_number=values.text("AccessionNumber", 16),
            study_date=values.text("StudyDate", 8),
            study_time=values.text("StudyTime", 16),
            order_priority=values.order_priority(),
            expected_instances=values.integer("NumberOfStudyRelatedInstances"),
            source_ae=values.source_ae(),
        )
    except Exception as exc:
        raise DicomInputError(f"unreadable attribute: {type(exc).__name__}") from exc
