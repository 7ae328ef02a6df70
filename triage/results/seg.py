"""Build the DICOM Segmentation of a model run: one binary segment per finding type."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

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


def _state_series_spacing(
    segmentation: hd.seg.Segmentation, source: Sequence[Dataset], first_covered: Dataset
) -> None:
    """Set Spacing Between Slices to that of the whole source series, as if it were all given.

    highdicom copies the value from the first source image it is given when that image has
    one; otherwise it derives it from the planes it is given, which here are only the covered
    slices: one slice would read 1 mm, slices with a gap would drop it. The value describes
    how to rebuild a volume from the frames, so it is derived from every slice position (one
    cheap read of each header), with highdicom's own rule: left out unless regularly spaced.
    """
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared or "SpacingBetweenSlices" in first_covered:
        return  # no patient coordinates, or highdicom copied the source's own value
    spacing, _ = hd.spatial.get_volume_positions(
        image_positions=[ds.ImagePositionPatient for ds in source],
        image_orientation=shared.PlaneOrientationSequence[0].ImageOrientationPatient,
    )
    measures = shared.PixelMeasuresSequence[0]
    if spacing is None:
        measures.pop("SpacingBetweenSlices", None)
    else:
        measures.SpacingBetweenSlices = format_number_as_ds(spacing)


def build_segmentation(result: ResultInput) -> hd.seg.Segmentation | None:
    """The SEG of ``result``, or None when no finding names a segment.

    A negative study (nothing above the operating point) has nothing to segment, so it gets
    no SEG; its SR alone says the algorithm ran and found nothing.

    Only the slices a segment covers are handed to highdicom, so the SEG holds a frame per
    segment and covered slice and references just those slices (per frame in the Derivation
    Image Functional Group, and in the Source Image and Referenced Series Sequences). With a
    Frame of Reference, each frame is placed by its Plane Position (Patient), so the SEG needs
    no reference to a slice without a frame (PS3.3 A.51.5, C.12.2).
    """
    segments = result.segments
    if result.mask is None or not segments:
        return None
    covered = sorted({index for slices in result.segment_slices.values() for index in slices})
    sources = [result.source[index] for index in covered]
    identity = result.algorithm
    algorithm = hd.AlgorithmIdentificationSequence(
        name=identity.name,
        family=identity.family_code,
        version=identity.version,
        source=identity.manufacturer,
    )

    segmentation = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=result.mask[covered].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment_description(number, finding, algorithm) for number, finding in segments.items()
        ],
        series_instance_uid=result.uid(ResultUid.SEG_SERIES),
        series_number=result.seg_series_number,
        sop_instance_uid=result.uid(ResultUid.SEG_INSTANCE),
        **identity.equipment(),
    )
    _state_series_spacing(segmentation, result.source, sources[0])
    return segmentation
