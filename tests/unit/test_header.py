"""The header reader against pydicom's full reader, on every DICOM file pydicom and
pydicom-data ship, and against truncation anywhere."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.data.data_manager import external_data_sources
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tests.helpers.instances import pydicom_file
from triage.dicom.header import InstanceHeader, parse_header
from triage.dicom.uids import is_valid_uid
from triage.errors import DicomInputError


def _files() -> list[Path]:
    """pydicom's own test files and pydicom-data's, from disk only: pydicom's
    ``get_testdata_files`` also downloads any file of its online list missing from
    its cache, which hangs where the network is closed (CI)."""
    paths = set(Path(pydicom.data.__file__).parent.joinpath("test_files").glob("*"))
    for source in external_data_sources().values():
        paths.update(Path(str(path)) for path in source.get_paths("*", 0))
    return sorted(path for path in paths if path.is_file() and path.stat().st_size < 8_000_000)


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


def _priority(ds: Dataset) -> str | None:
    for keyword in ("RequestedProcedurePriority", "ScheduledProcedureStepPriority"):
        if value := _text(ds, keyword, 16):
            return value.upper()
    for item in ds.get("RequestAttributesSequence", []):
        if value := _text(item, "RequestedProcedurePriority", 16):
            return value.upper()
    return None


def reference(data: bytes) -> InstanceHeader | None:
    """What pydicom's complete reader makes of ``data`` (None when it has no valid UIDs)."""
    ds = dcmread(BytesIO(data))
    uids: dict[str, Any] = {
        "sop_class_uid": ds.get("SOPClassUID"),
        "sop_instance_uid": ds.get("SOPInstanceUID"),
        "study_uid": ds.get("StudyInstanceUID"),
        "series_uid": ds.get("SeriesInstanceUID"),
        "transfer_syntax_uid": ds.file_meta.get("TransferSyntaxUID"),
    }
    if any(value is None or not is_valid_uid(str(value)) for value in uids.values()):
        return None
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
        order_priority=_priority(ds),
        expected_instances=_int(ds, "NumberOfStudyRelatedInstances"),
        source_ae=_text(ds.file_meta, "SourceApplicationEntityTitle", 16),
    )


TRUNCATED = {"MR_truncated.dcm", "rtplan_truncated.dcm"}
"""pydicom reads these without complaint; the bytes of their last element are missing."""


def test_agrees_with_pydicom_on_every_test_file() -> None:
    compared = 0
    for path in _files():
        data = path.read_bytes()
        if data[128:132] != b"DICM" or path.name in TRUNCATED:
            with pytest.raises(DicomInputError):
                parse_header(data)
            continue
        try:
            expected = reference(data)
        except Exception:
            expected = None  # pydicom cannot read it either
        if expected is None:
            with pytest.raises(DicomInputError):
                parse_header(data)
            continue
        assert parse_header(data) == expected, path.name
        compared += 1
    assert compared > 100  # most of pydicom's and pydicom-data's files are whole instances


def _with(**attributes: Any) -> bytes:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_order_priority_inside_request_attributes_and_character_sets(syntax: str) -> None:
    item = Dataset()
    item.RequestedProcedurePriority = "stat"
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.RequestAttributesSequence = [Dataset(), item]
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Gürtler^Ünal"
    ds.StudyDescription = "Schädel nativ"
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    data = buffer.getvalue()
    header = parse_header(data)
    assert header == reference(data)
    assert header.order_priority == "STAT"
    assert header.patient_name == "Gürtler^Ünal"
    assert header.study_description == "Schädel nativ"


def test_every_truncation_inside_an_element_is_refused() -> None:
    data = _with(StudyDescription="complete")
    full = dcmread(BytesIO(data))
    assert parse_header(data).study_description == "complete"
    accepted = []
    for cut in range(132, len(data), 7):
        try:
            parse_header(data[:cut])
        except DicomInputError:
            continue
        accepted.append(cut)
        # Only a cut between two top-level elements leaves a well-formed (shorter) data set.
        group, element = struct.unpack_from("<HH", data, cut)
        assert Tag(group, element) in full, f"cut at {cut} accepted"
    assert len(accepted) < 60


@pytest.mark.parametrize(
    "attributes",
    [
        {"PatientName": "Doe^John^^Dr", "StudyDescription": " CT HEAD  ", "Modality": "CT"},
        {"PatientName": "Yamada^Tarou=山田^太郎", "SpecificCharacterSet": ["", "ISO 2022 IR 87"]},
        {"PatientID": "ID\x00\x00", "AccessionNumber": "A1 \x00", "StudyTime": "101010.5 "},
        {"SeriesDescription": ["AX", "CORONAL"], "BodyPartExamined": "HEAD\\NECK"},
        {"StudyDescription": "Kopf\x1b(B", "SpecificCharacterSet": "ISO 2022 IR 100"},
        {"InstanceNumber": " 12 ", "SeriesNumber": "3"},
    ],
    ids=["ascii", "iso2022-pn", "nulls-and-spaces", "multi-valued", "escape", "integers"],
)
def test_values_read_as_pydicom_reads_them(attributes: dict[str, Any]) -> None:
    """ASCII values are decoded without pydicom; these must still come out as pydicom's."""
    data = _with(**attributes)
    assert parse_header(data) == reference(data)


def test_a_deflated_data_set_that_inflates_past_the_bound_is_refused() -> None:
    """A few hundred KiB deflated can inflate to gigabytes: the reader stops at its bound
    (256 MiB, documented in the conformance statement) instead of inflating it all."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.EncapsulatedDocument = bytes(300 << 20)  # zeros: about 300 KiB deflated
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert len(data) < 2 << 20
    with pytest.raises(DicomInputError, match="inflates beyond"):
        parse_header(data)
    del ds.EncapsulatedDocument
    small = BytesIO()
    ds.save_as(small, enforce_file_format=True)
    assert parse_header(small.getvalue()) == reference(small.getvalue())
