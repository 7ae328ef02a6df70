"""Large multiframe objects for the receiver's large-object measurements and tests, written
piece by piece so that making one never holds it in memory."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7.3"
"""Multi-frame Grayscale Word Secondary Capture Image Storage (PS3.4 B.5)."""
FRAME_ROWS = FRAME_COLUMNS = 512
FRAME_BYTES = FRAME_ROWS * FRAME_COLUMNS * 2
_PIXEL_DATA_OW = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 0)[:-4]


def write_multiframe(
    path: Path, size_bytes: int, *, seed: int = 0, study_uid: str | None = None
) -> str:
    """A 16-bit multiframe image of 512x512 frames, at least ``size_bytes`` of random pixel
    data (explicit VR little endian); returns its SOP Instance UID."""
    frames = max(1, -(-size_bytes // FRAME_BYTES))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MULTIFRAME_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MULTIFRAME_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = UID(study_uid) if study_uid else generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Large^Object"
    ds.PatientID = "LARGE"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = FRAME_ROWS, FRAME_COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    dcmwrite(path, ds, enforce_file_format=True)
    rng = np.random.default_rng(seed)
    with path.open("ab") as file:
        file.write(_PIXEL_DATA_OW + struct.pack("<L", frames * FRAME_BYTES))
        for _frame in range(frames):
            file.write(rng.integers(0, 1 << 16, FRAME_BYTES // 2, dtype="<u2").tobytes())
    return str(ds.SOPInstanceUID)
