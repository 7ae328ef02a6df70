"""Build the DICOM Segmentation of a model run: one binary segment per finding type."""

from __future__ import annotations

import highdicom as hd
import numpy as np

from triage.dicom.uids import ResultUid
from triage.results.inputs import FindingInput, ResultInput


def _segment_description(
    number: int, finding: FindingInput, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=finding.label,
        segmented_property_category=finding.category,
        segmented_property_type=finding.code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def build_segmentation(result: ResultInput) -> hd.seg.Segmentation | None:
    """The SEG of ``result``, or None when no finding names a segment.

    A negative study (nothing above the operating point) has nothing to segment, so it gets
    no SEG; its SR alone says the algorithm ran and found nothing.
    """
    segments = result.segments
    if result.mask is None or not segments:
        return None
    identity = result.algorithm
    algorithm = hd.AlgorithmIdentificationSequence(
        name=identity.name,
        family=identity.family_code,
        version=identity.version,
        source=identity.manufacturer,
    )

    return hd.seg.Segmentation(
        source_images=result.source,
        pixel_array=result.mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment_description(number, finding, algorithm) for number, finding in segments.items()
        ],
        series_instance_uid=result.uid(ResultUid.SEG_SERIES),
        series_number=result.seg_series_number,
        sop_instance_uid=result.uid(ResultUid.SEG_INSTANCE),
        instance_number=1,
        manufacturer=identity.manufacturer,
        manufacturer_model_name=identity.name,
        software_versions=identity.version,
        device_serial_number=identity.device_uid,
        series_description=identity.name,
        contributing_equipment=[identity.contributing_equipment()],
    )
