"""Build the Comprehensive 3D SR of a model run: a TID 1500 Measurement Report (IHE AI Results)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from triage.dicom.uids import ResultUid
from triage.results.inputs import AlgorithmIdentity, FindingInput, ResultInput

PRESENT: Code = codes.SCT.Present
ABSENT: Code = codes.SCT.Absent
PROBABILITY: Code = codes.DCM.Probability
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
VOLUME: Code = codes.SCT.Volume
MILLILITRE = Code("ml", "UCUM", "milliliter")

MeasurementGroup = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def _location_slices(location: tuple[float, float, float]) -> tuple[int, ...]:
    """The source slices a location lies on: its own slice, or the two it lies between."""
    return tuple(sorted({math.floor(location[0]), math.ceil(location[0])}))


def _point_location(finding: FindingInput) -> tuple[float, float, float] | None:
    """The location the SR gives as the finding's region: only when it has no segment."""
    return finding.location if finding.segment_number is None else None


def _source_image(source: Dataset) -> hd.sr.SourceImageForSegmentation:
    return hd.sr.SourceImageForSegmentation(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
    )


def _patient_position(
    source: Sequence[Dataset], location: tuple[float, float, float]
) -> npt.NDArray[np.float64]:
    """Patient coordinates (mm) of a possibly fractional voxel index (slice, row, col).

    The slice position is interpolated between the two slices the index lies between.
    """
    slice_index, row, column = location
    lower, upper = math.floor(slice_index), math.ceil(slice_index)
    below = np.array(source[lower].ImagePositionPatient, dtype=np.float64)
    above = np.array(source[upper].ImagePositionPatient, dtype=np.float64)
    origin = below + (slice_index - lower) * (above - below)
    orientation = np.array(source[0].ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(value) for value in source[0].PixelSpacing)
    # The first direction cosines follow increasing column index, the second increasing row.
    return origin + column * column_spacing * orientation[:3] + row * row_spacing * orientation[3:]


def _location_surface(
    source: Sequence[Dataset], location: tuple[float, float, float]
) -> hd.sr.VolumeSurface:
    """The location as a 3D point, with the slices it lies on as its source images."""
    return hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=_patient_position(source, location).reshape(1, 3),
        frame_of_reference_uid=source[0].FrameOfReferenceUID,
        source_images=[_source_image(source[index]) for index in _location_slices(location)],
    )


def _referenced_segments(
    result: ResultInput, segmentation: hd.seg.Segmentation | None
) -> dict[int, hd.sr.ReferencedSegment]:
    """Each segment with the source images it covers, by segment number.

    Built from the mask: highdicom's ``ReferencedSegment.from_segmentation`` fails on a SEG
    whose frames all hold one segment (it then sits in the shared functional groups).
    """
    if segmentation is None:
        return {}
    return {
        number: hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=number,
            source_images=[_source_image(result.source[index]) for index in slices],
        )
        for number, slices in result.segment_slices.items()
    }


def _referenced_slices(result: ResultInput) -> list[int]:
    """Source slice indices the findings' regions reference, in slice order.

    Each segment's covered slices and the slices each location point lies on: what the image
    library lists and the evidence must name, and no more.
    """
    indices = {index for slices in result.segment_slices.values() for index in slices}
    for finding in result.findings:
        location = _point_location(finding)
        if location is not None:
            indices.update(_location_slices(location))
    return sorted(indices)


def _measurement_group(
    number: int,
    finding: FindingInput,
    result: ResultInput,
    segments: dict[int, hd.sr.ReferencedSegment],
) -> MeasurementGroup:
    """TID 1411 with the finding's segment or location as its region, else TID 1501."""
    identity = result.algorithm
    tracking = hd.sr.TrackingIdentifier(
        uid=finding.tracking_uid, identifier=f"{finding.label} {number}"
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=identity.name,
        version=identity.version,
        family=identity.family_code,
        manufacturer=identity.manufacturer,
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=finding.code, value=PRESENT if finding.positive else ABSENT
        )
    ]
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=finding.probability, unit=PROBABILITY_UNIT)
    ]
    if finding.volume_ml is not None:
        measurements.append(
            hd.sr.Measurement(name=VOLUME, value=finding.volume_ml, unit=MILLILITRE)
        )
    segment = None if finding.segment_number is None else segments[finding.segment_number]
    location = _point_location(finding)
    surface = None if location is None else _location_surface(result.source, location)
    if segment is None and surface is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=finding.code,
            finding_category=finding.category,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=segment,
        referenced_volume_surface=surface,
        finding_type=finding.code,
        finding_category=finding.category,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _observation_context(identity: AlgorithmIdentity) -> hd.sr.ObservationContext:
    """The algorithm as the device observer (TID 1002/1004)."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=identity.device_uid,
                name=identity.name,
                manufacturer_name=identity.manufacturer,
                model_name=identity.name,
            ),
        )
    )


def build_sr(
    result: ResultInput, segmentation: hd.seg.Segmentation | None
) -> hd.sr.Comprehensive3DSR:
    """The SR of ``result``: one measurement group per finding, negative findings included.

    ``segmentation`` is ``build_segmentation(result)``: None exactly when no finding names a
    segment. Each group carries the finding type, its presence (present or absent at the
    model's operating point), its probability and, where known, its volume and its region.

    The SR references only the source images its regions need: the slices each segment
    covers and the slices a location point lies on (TID 1411 rows 11/12). The optional image
    library (TID 1500 row 5, TID 1600) lists just those, and so does the Current Requested
    Procedure Evidence Sequence, with the SEG: this SR is not the final report of the
    procedure, so the sequence must hold at least the instances its content references, not
    every instance acquired (PS3.3 C.17.2.3). With no image referenced (a negative study) the
    sequence is still required, since the analysed series is known (PS3.3 Table C.17-2, type
    1C), and names that series by its first instance.
    """
    if (segmentation is None) != (not result.segments):
        raise ValueError("segmentation must be build_segmentation(result)")
    if segmentation is not None and segmentation.StudyInstanceUID != result.study_uid:
        raise ValueError("segmentation belongs to another study")
    identity = result.algorithm
    segments = _referenced_segments(result, segmentation)
    images = [result.source[index] for index in _referenced_slices(result)]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(identity),
        procedure_reported=result.procedure,
        imaging_measurements=[
            _measurement_group(number, finding, result, segments)
            for number, finding in enumerate(result.findings, start=1)
        ],
        referenced_images=images,
    )

    evidence = [*images, *([segmentation] if segmentation is not None else [])]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence or [result.source[0]],
        content=report,
        series_instance_uid=result.uid(ResultUid.SR_SERIES),
        series_number=result.sr_series_number,
        sop_instance_uid=result.uid(ResultUid.SR_INSTANCE),
        is_complete=True,
        **identity.equipment(),
    )
