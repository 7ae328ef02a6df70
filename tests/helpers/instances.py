"""Small DICOM instances for receiver tests: copies of pydicom's CT_small with fresh UIDs,
and raw files whose body is whatever a test wants to send (garbage, truncated)."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is not available offline"
    return Path(str(path))


@dataclass(frozen=True)
class SentStudy:
    study_uid: str
    series_uid: str
    paths: list[Path]


def ct_study(out_dir: Path, count: int, *, study_uid: str | None = None) -> SentStudy:
    """``count`` CT instances of one new series (one new study unless ``study_uid`` is given)."""
    template = dcmread(pydicom_file("CT_small.dcm"))
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
        ds = template.copy()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        ds.BodyPartExamined = "HEAD"
        path = out_dir / f"{series_uid[-12:]}-{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return SentStudy(study_uid, series_uid, paths)


def dataset_bytes_of(path: Path) -> bytes:
    """The dataset part of a DICOM file, as stored: everything after the file meta."""
    data = path.read_bytes()
    fp = BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return data[fp.tell() :]


def raw_file(path: Path, body: bytes, *, sop_class_uid: str, sop_instance_uid: str) -> Path:
    """A file with a valid file meta header and ``body`` as its dataset, sent byte for byte."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + body)
    return path


def dataset_body(ds: Dataset) -> bytes:
    """The explicit VR little endian encoding of ``ds`` without preamble or meta."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = False
    buffer.is_little_endian = True
    write_dataset(buffer, ds)
    return buffer.getvalue()


CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def radiograph(out_dir: Path, *, rows: int = 256, cols: int = 256) -> SentStudy:
    """One CR chest image: a study of its own, no patient geometry (as projection images are)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "RADIOGRAPH^TEST", "RAD0001"
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PatientOrientation = ["L", "F"]
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261121", "101500", "CR0001"
    ds.ReferringPhysicianName, ds.StudyID = "", "1"
    pixels = np.random.default_rng(7).integers(0, 4096, (rows, cols), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return SentStudy(ds.StudyInstanceUID, ds.SeriesInstanceUID, [path])
