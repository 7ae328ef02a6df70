"""A small synthetic axial CT series (CT Image Storage) and model runs on it, for tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

from triage.dicom.uids import new_uid, tracking_uid
from triage.results.inputs import CT_HEAD, AlgorithmIdentity, FindingInput, ResultInput

PIXEL_SPACING_MM = 0.8
SLICE_THICKNESS_MM = 5.0


def make_ct_series(
    *, study_uid: str | None = None, slices: int = 8, rows: int = 64, columns: int = 64
) -> list[Dataset]:
    """Datasets of one axial CT series of a water disc, sorted by position (feet to head)."""
    study_uid = study_uid or new_uid()
    series_uid = new_uid()
    frame_of_reference_uid = new_uid()
    yy, xx = np.mgrid[:rows, :columns]
    disc = (yy - rows / 2) ** 2 + (xx - columns / 2) ** 2 < (min(rows, columns) / 2.5) ** 2
    pixels = np.where(disc, 1024, 24).astype(np.int16)  # stored values; HU = value - 1024
    series = []
    for index in range(slices):
        ds = Dataset()
        sop_instance_uid = new_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_instance_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = "Phantom^Water"
        ds.PatientID = "PHANTOM-1"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT HEAD"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = "Head 5mm"
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        ds.Manufacturer = "Synthetic"
        ds.ManufacturerModelName = "Phantom"
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = index + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20260101"
        ds.ContentTime = "120000"
        ds.ImagePositionPatient = [-25.6, -25.6, index * SLICE_THICKNESS_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
        ds.SliceThickness = SLICE_THICKNESS_MM
        ds.SliceLocation = index * SLICE_THICKNESS_MM
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        ds.PixelData = pixels.tobytes()
        series.append(ds)
    return series


# Model runs on such a series, as the SEG and SR builders take them.

ALGORITHM = AlgorithmIdentity(name="ich-detector", version="1.0.0")
HEMORRHAGE: Code = codes.SCT.IntracranialHemorrhage
NEOPLASM: Code = codes.SCT.Neoplasm
EDEMA: Code = codes.SCT.Edema
VOXEL_ML = PIXEL_SPACING_MM * PIXEL_SPACING_MM * SLICE_THICKNESS_MM / 1000


def _result(
    source: list[Dataset],
    algorithm: AlgorithmIdentity,
    findings: list[FindingInput],
    mask: npt.NDArray[np.uint8] | None,
) -> ResultInput:
    return ResultInput(
        source=source,
        algorithm=algorithm,
        findings=findings,
        mask=mask,
        study_uid=source[0].StudyInstanceUID,
        procedure=CT_HEAD,
        seg_series_number=9901,
        sr_series_number=9902,
    )


def _tracking(source: list[Dataset], algorithm: AlgorithmIdentity, index: int) -> str:
    return tracking_uid(
        study_uid=source[0].StudyInstanceUID,
        model_name=algorithm.name,
        model_version=algorithm.version,
        finding_index=index,
    )


def positive_result(source: list[Dataset], algorithm: AlgorithmIdentity = ALGORITHM) -> ResultInput:
    """Two hemorrhages (segment 1), a neoplasm (segment 2) and edema checked and absent."""
    mask = np.zeros((len(source), source[0].Rows, source[0].Columns), np.uint8)
    mask[2:4, 20:30, 20:30] = 1  # 200 voxels
    mask[5, 40:45, 40:45] = 1  # 25 voxels
    mask[4:7, 10:16, 40:50] = 2  # 180 voxels

    def finding(
        index: int, code: Code, label: str, probability: float, **extra: Any
    ) -> FindingInput:
        return FindingInput(
            label=label,
            code=code,
            probability=probability,
            positive=probability >= 0.5,
            tracking_uid=_tracking(source, algorithm, index),
            **extra,
        )

    findings = [
        finding(0, HEMORRHAGE, "hemorrhage", 0.93, volume_ml=200 * VOXEL_ML, segment_number=1),
        finding(1, HEMORRHAGE, "hemorrhage", 0.71, volume_ml=25 * VOXEL_ML, segment_number=1),
        finding(2, NEOPLASM, "neoplasm", 0.64, volume_ml=180 * VOXEL_ML, segment_number=2),
        finding(3, EDEMA, "edema", 0.08),
    ]
    return _result(source, algorithm, findings, mask)


def negative_result(source: list[Dataset], algorithm: AlgorithmIdentity = ALGORITHM) -> ResultInput:
    """Hemorrhage checked and absent: no mask, one negative finding."""
    absent = FindingInput(
        label="hemorrhage",
        code=HEMORRHAGE,
        probability=0.03,
        positive=False,
        tracking_uid=_tracking(source, algorithm, 0),
    )
    return _result(source, algorithm, [absent], None)


def located_result(source: list[Dataset], algorithm: AlgorithmIdentity = ALGORITHM) -> ResultInput:
    """A hemorrhage found with a location but no mask (a detector without segmentation)."""
    found = FindingInput(
        label="hemorrhage",
        code=HEMORRHAGE,
        probability=0.88,
        positive=True,
        tracking_uid=_tracking(source, algorithm, 0),
        location=(2.5, 10.0, 20.0),
    )
    return _result(source, algorithm, [found], None)
