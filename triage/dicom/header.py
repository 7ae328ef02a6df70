"""Read what the index needs from an encoded instance, without decoding its pixels.

A received instance is checked for structure (every element fits in the bytes received) and for
the identifying UIDs; anything else is left as it came.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from triage.dicom.uids import is_valid_uid
from triage.errors import DicomInputError

UNDEFINED_LENGTH = 0xFFFFFFFF


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


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _order_priority(ds: Dataset) -> str | None:
    """Requested Procedure Priority, else Scheduled Procedure Step Priority of the order."""
    for keyword in ("RequestedProcedurePriority", "ScheduledProcedureStepPriority"):
        if value := _text(ds, keyword, 16):
            return value.upper()
    for item in ds.get("RequestAttributesSequence", []):
        if value := _text(item, "RequestedProcedurePriority", 16):
            return value.upper()
    return None


# Values larger than this are skipped, not read: pixel data, overlays, big private blobs.
DEFER_BYTES = 4096


def _read_checked(data: bytes) -> Dataset:
    """Read the dataset's elements once, checking that each fits inside ``data``.

    pydicom reads a short value without complaint, so a truncated send would otherwise pass.
    Large values are left unread; the header attributes the index needs are all small.
    """
    fp = BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    syntax = UID(meta.get("TransferSyntaxUID", ""))
    if syntax == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(data[fp.tell() :], -zlib.MAX_WBITS)
        fp, end = BytesIO(body), len(body)
    else:
        end = len(data)
    implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    elements = {}
    for element in data_element_generator(fp, implicit, little, defer_size=DEFER_BYTES):
        if isinstance(element, RawDataElement):
            if element.length != UNDEFINED_LENGTH and element.value_tell + element.length > end:
                raise DicomInputError(
                    f"element {element.tag} declares {element.length} bytes past the end"
                )
            if element.value is None and element.length > DEFER_BYTES:
                continue  # deferred: not needed for the index
        elements[element.tag] = element
    ds = Dataset(elements)
    ds.file_meta = meta
    ds.set_original_encoding(implicit, little)
    return ds


def parse_header(data: bytes) -> InstanceHeader:
    """The index attributes of a DICOM file held in ``data`` (preamble and file meta included).

    Raises DicomInputError for anything that cannot be parsed or lacks a valid identifying UID.
    """
    try:
        return _header_from(_read_checked(data))
    except DicomInputError:
        raise
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise DicomInputError(f"unparseable dataset: {type(exc).__name__}") from exc


def _header_from(ds: Dataset) -> InstanceHeader:
    uids: dict[str, Any] = {
        "sop_class_uid": ds.get("SOPClassUID"),
        "sop_instance_uid": ds.get("SOPInstanceUID"),
        "study_uid": ds.get("StudyInstanceUID"),
        "series_uid": ds.get("SeriesInstanceUID"),
        "transfer_syntax_uid": ds.file_meta.get("TransferSyntaxUID"),
    }
    for name, value in uids.items():
        if value is None or not is_valid_uid(str(value)):
            raise DicomInputError(f"missing or invalid {name}")
    return InstanceHeader(
        **{name: str(value) for name, value in uids.items()},
        modality=_text(ds, "Modality", 16),
        body_part=_text(ds, "BodyPartExamined", 16),
        study_description=_text(ds, "StudyDescription", 64),
        series_description=_text(ds, "SeriesDescription", 64),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        patient_name=_text(ds, "PatientName", 324),
        patient_id=_text(ds, "PatientID", 64),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        order_priority=_order_priority(ds),
        expected_instances=_int(ds, "NumberOfStudyRelatedInstances"),
    )
