"""SEG and SR builders: read back with highdicom's readers, content and deterministic UIDs."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from tests.helpers.ct_series import (
    ALGORITHM,
    EDEMA,
    HEMORRHAGE,
    NEOPLASM,
    SLICE_THICKNESS_MM,
    VOXEL_ML,
    located_result,
    make_ct_series,
    negative_result,
    positive_result,
)
from triage.results.inputs import AlgorithmIdentity, ResultInput
from triage.results.seg import build_segmentation
from triage.results.sr import build_sr

# Concept names of the measurements, from pydicom's code dictionary (the standard's PS3.16
# tables), not from the builders' own constants.
VOLUME_CONCEPT = codes.SCT.Volume
PROBABILITY_CONCEPT = codes.DCM.Probability


@pytest.fixture
def source() -> list[Dataset]:
    return make_ct_series()


def _roundtrip(dataset: Dataset) -> BytesIO:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def _seg_and_sr(result: ResultInput) -> tuple[hd.seg.Segmentation, hd.sr.Comprehensive3DSR]:
    segmentation = build_segmentation(result)
    assert segmentation is not None
    return segmentation, build_sr(result, segmentation)


def _read_sr(
    built: hd.sr.Comprehensive3DSR,
) -> tuple[hd.sr.Comprehensive3DSR, hd.sr.MeasurementReport]:
    """The SR read back with highdicom's reader, and its TID 1500 Measurement Report."""
    sr = hd.sr.srread(_roundtrip(built))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr, sr.content


def _algorithm_equipment(dataset: Dataset) -> Dataset:
    item: Dataset
    (item,) = [
        candidate
        for candidate in dataset.ContributingEquipmentSequence
        if candidate.PurposeOfReferenceCodeSequence[0].CodeValue == "1630"
    ]
    return item


def test_segmentation_has_one_segment_per_finding_type(source: list[Dataset]) -> None:
    result = positive_result(source)
    segmentation = hd.seg.segread(_roundtrip(_seg_and_sr(result)[0]))

    assert segmentation.StudyInstanceUID == source[0].StudyInstanceUID
    assert segmentation.PatientID == source[0].PatientID
    assert segmentation.SeriesNumber == 9901
    assert segmentation.get_segment_numbers() == [1, 2]
    types = [segmentation.get_segment_description(n).segmented_property_type for n in (1, 2)]
    assert types == [HEMORRHAGE, NEOPLASM]
    algorithm = segmentation.get_segment_description(1).algorithm_identification
    assert algorithm is not None
    assert algorithm[0].AlgorithmName == ALGORITHM.name
    assert algorithm[0].AlgorithmVersion == ALGORITHM.version
    # The SEG references only the slices with a frame; the others read back as empty.
    labels = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(labels, result.mask)
    assert segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID


@pytest.mark.parametrize("slices", [(4,), (1, 2, 6)], ids=["one slice", "slices with a gap"])
def test_segmentation_states_the_series_slice_spacing(
    source: list[Dataset], slices: tuple[int, ...]
) -> None:
    """Frames of a few slices still tell a reader how far apart the series' slices lie."""
    result = positive_result(source)
    mask = np.zeros((len(source), source[0].Rows, source[0].Columns), np.uint8)
    mask[list(slices), 10:20, 10:20] = 1
    segmentation = build_segmentation(
        dataclasses.replace(result, findings=[result.findings[0]], mask=mask)
    )
    assert segmentation is not None

    assert segmentation.NumberOfFrames == len(slices)
    measures = segmentation.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(SLICE_THICKNESS_MM)


def test_segmentation_of_an_irregular_series_states_no_slice_spacing(
    source: list[Dataset],
) -> None:
    """No one spacing describes such a series, even where the segmented slices are regular."""
    source[6].ImagePositionPatient = [-25.6, -25.6, 6 * SLICE_THICKNESS_MM + 1.0]
    result = positive_result(source)
    mask = np.zeros((len(source), source[0].Rows, source[0].Columns), np.uint8)
    mask[2:4, 10:20, 10:20] = 1
    segmentation = build_segmentation(
        dataclasses.replace(result, findings=[result.findings[0]], mask=mask)
    )
    assert segmentation is not None

    measures = segmentation.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert "SpacingBetweenSlices" not in measures


def test_both_objects_name_the_algorithm_as_contributing_equipment(source: list[Dataset]) -> None:
    for dataset in _seg_and_sr(positive_result(source)):
        item = _algorithm_equipment(dataset)
        assert item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
        assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        assert item.Manufacturer == ALGORITHM.manufacturer
        assert item.ManufacturerModelName == ALGORITHM.name
        assert item.SoftwareVersions == ALGORITHM.version
        assert item.DeviceUID == ALGORITHM.device_uid
        assert dataset.Manufacturer == ALGORITHM.manufacturer


def test_sr_reports_each_finding_with_its_segment(source: list[Dataset]) -> None:
    result = positive_result(source)
    segmentation, built = _seg_and_sr(result)
    sr, report = _read_sr(built)

    assert sr.StudyInstanceUID == source[0].StudyInstanceUID
    assert sr.SeriesNumber == 9902
    assert sr.SeriesInstanceUID != segmentation.SeriesInstanceUID
    observer = report.get_observer_contexts()[0].observer_identifying_attributes
    assert isinstance(observer, hd.sr.DeviceObserverIdentifyingAttributes)
    assert observer.uid == ALGORITHM.device_uid
    procedures = [
        item.ConceptCodeSequence[0]
        for item in report[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ProcedureReported.value
    ]
    # LOINC 24725-4 "CT Head": the procedure the SR reports (TID 1500, Procedure Reported).
    assert [(code.CodeValue, code.CodingSchemeDesignator) for code in procedures] == [
        ("24725-4", "LN")
    ]

    volumetric = report.get_volumetric_roi_measurement_groups()
    assert [group.finding_type for group in volumetric] == [HEMORRHAGE, HEMORRHAGE, NEOPLASM]
    for group, finding in zip(volumetric, result.findings[:3], strict=True):
        assert group.tracking_uid == finding.tracking_uid
        assert group.referenced_segment is not None
        segment = group.referenced_segment[0]
        assert segment.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            segmentation.SOPInstanceUID
        )
        assert segment.ReferencedSOPSequence[0].ReferencedSegmentNumber == finding.segment_number
        (volume,) = group.get_measurements(name=VOLUME_CONCEPT)
        assert volume.value == pytest.approx(finding.volume_ml)
        assert volume.unit.value == "ml"
        (probability,) = group.get_measurements(name=PROBABILITY_CONCEPT)
        assert probability.value == pytest.approx(finding.probability)
        (presence,) = group.get_qualitative_evaluations(name=finding.code)
        assert presence.value == codes.SCT.Present
    assert volumetric[2].get_measurements(name=VOLUME_CONCEPT)[0].value == pytest.approx(
        180 * VOXEL_ML
    )

    (absent,) = report.get_image_measurement_groups()
    assert absent.finding_type == EDEMA
    assert absent.get_qualitative_evaluations(name=EDEMA)[0].value == codes.SCT.Absent
    assert absent.get_measurements(name=VOLUME_CONCEPT) == []


def test_sr_evidence_is_the_segmented_slices_and_the_segmentation(source: list[Dataset]) -> None:
    """The evidence names what the content references (PS3.3 C.17.2.3), not every slice."""
    result = positive_result(source)
    assert result.mask is not None
    segmentation, sr = _seg_and_sr(result)
    evidence = {
        reference.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    }
    segmented = {source[index].SOPInstanceUID for index in np.flatnonzero(result.mask.any((1, 2)))}
    assert len(segmented) < len(source)
    assert evidence == segmented | {segmentation.SOPInstanceUID}


def test_negative_study_gets_an_sr_without_a_segmentation(source: list[Dataset]) -> None:
    result = negative_result(source)
    assert build_segmentation(result) is None
    sr, report = _read_sr(build_sr(result, None))

    assert sr.StudyInstanceUID == source[0].StudyInstanceUID
    assert report.get_volumetric_roi_measurement_groups() == []
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type == HEMORRHAGE
    assert group.get_qualitative_evaluations(name=HEMORRHAGE)[0].value == codes.SCT.Absent
    assert group.get_measurements(name=PROBABILITY_CONCEPT)[0].value == pytest.approx(0.03)
    assert _algorithm_equipment(sr).DeviceUID == ALGORITHM.device_uid


def test_a_located_finding_without_mask_gets_a_point(source: list[Dataset]) -> None:
    result = located_result(source)
    assert build_segmentation(result) is None
    _, report = _read_sr(build_sr(result, None))

    (group,) = report.get_volumetric_roi_measurement_groups()
    surface = group.roi
    assert isinstance(surface, hd.sr.VolumeSurface)
    (point,) = surface.graphic_data
    # Slice 2.5 lies halfway between z=10 and z=15; row 10 and column 20 at 0.8 mm spacing.
    np.testing.assert_allclose(point, [-25.6 + 20 * 0.8, -25.6 + 10 * 0.8, 12.5])
    # Its source images are the two slices it lies between.
    images = surface.source_images_for_segmentation
    assert [image.referenced_sop_instance_uid for image in images] == [
        source[2].SOPInstanceUID,
        source[3].SOPInstanceUID,
    ]


def test_uids_are_deterministic_per_study_model_and_version(source: list[Dataset]) -> None:
    seg, sr = _seg_and_sr(positive_result(source))
    seg_again, sr_again = _seg_and_sr(positive_result(source))
    newer = AlgorithmIdentity(name=ALGORITHM.name, version="1.1.0")
    seg_newer, sr_newer = _seg_and_sr(positive_result(source, newer))
    other_study = make_ct_series()
    seg_other, sr_other = _seg_and_sr(positive_result(other_study))

    assert (seg.SOPInstanceUID, sr.SOPInstanceUID) == (
        seg_again.SOPInstanceUID,
        sr_again.SOPInstanceUID,
    )
    assert seg.SeriesInstanceUID == seg_again.SeriesInstanceUID
    uids = {seg.SOPInstanceUID, sr.SOPInstanceUID, seg.SeriesInstanceUID, sr.SeriesInstanceUID}
    assert len(uids) == 4
    for changed in (seg_newer, sr_newer, seg_other, sr_other):
        assert changed.SOPInstanceUID not in uids
        assert changed.SeriesInstanceUID not in uids


def test_a_negative_study_keeps_its_sr_uid(source: list[Dataset]) -> None:
    positive = build_sr(positive_result(source), build_segmentation(positive_result(source)))
    negative = build_sr(negative_result(source), None)
    assert negative.SOPInstanceUID == positive.SOPInstanceUID


def test_sr_refuses_a_missing_segmentation(source: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="build_segmentation"):
        build_sr(positive_result(source), None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"findings": []}, "no findings"),
        ({"study_uid": "1.2.3"}, "study_uid"),
        ({"mask": None}, "no mask"),
        ({"mask": np.zeros((8, 64, 64), np.uint8)}, "mask labels"),
        ({"mask": np.ones((8, 32, 32), np.uint8)}, "mask shape"),
        ({"seg_series_number": 0}, "series numbers"),
    ],
)
def test_result_input_refuses_inconsistent_input(
    source: list[Dataset], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(positive_result(source), **change)


def test_one_type_must_stay_in_one_segment(source: list[Dataset]) -> None:
    result = positive_result(source)
    assert result.mask is not None
    mask = np.where(result.mask == 2, 3, result.mask).astype(np.uint8)
    mask[0, 0, 0] = 2
    split = dataclasses.replace(result.findings[1], segment_number=2)
    findings = [
        result.findings[0],
        split,
        dataclasses.replace(result.findings[2], segment_number=3),
    ]
    with pytest.raises(ValueError, match="one finding type spread"):
        dataclasses.replace(result, findings=findings, mask=mask)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probability": 1.5}, "probability"),
        ({"probability": float("nan")}, "probability"),
        ({"volume_ml": float("nan")}, "volume_ml"),
        ({"positive": False}, "negative finding"),
        ({"tracking_uid": "1.02"}, "tracking_uid"),
        ({"label": ""}, "label"),
        ({"segment_number": 0}, "segment_number"),
    ],
)
def test_finding_input_refuses_inconsistent_input(
    source: list[Dataset], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(positive_result(source).findings[0], **change)
