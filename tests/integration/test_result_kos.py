"""Key Object Selection documents: a run's key images (IHE AI Results) and the rejection note
withdrawing an earlier run's SEG and SR (IHE IOCM). dciodvfy finds no errors in either.

Expected codes and UIDs are written out from the standard (PS3.16 CID 7010, PS3.6), not taken
from the module under test.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.helpers.ct_series import (
    ALGORITHM,
    located_result,
    make_ct_series,
    negative_result,
    positive_result,
)
from tests.integration.test_result_dciodvfy import _dciodvfy_errors
from triage.results.inputs import AlgorithmIdentity, ResultInput
from triage.results.kos import (
    InstanceReference,
    build_key_object_selection,
    build_rejection_note,
    key_slices,
)
from triage.results.seg import build_segmentation
from triage.results.sr import build_sr

KEY_OBJECT_SELECTION_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
OF_INTEREST = ("113000", "DCM", "Of Interest")  # CID 7010
REJECTED_FOR_QUALITY_REASONS = ("113001", "DCM", "Rejected for Quality Reasons")  # CID 7010
KEY_OBJECT_DESCRIPTION = ("113012", "DCM", "Key Object Description")
PROCESSING_ALGORITHM = ("1630", "99IHE")  # IHE AI Results, Contributing Equipment

KOS_SERIES_NUMBER = 9903
REJECTION_SERIES_NUMBER = 9904
SUPERSEDING = AlgorithmIdentity(name=ALGORITHM.name, version="1.1.0")

Run = tuple[ResultInput, hd.seg.Segmentation | None, hd.sr.Comprehensive3DSR]


def _run(make_result: Callable[..., ResultInput], source: list[Dataset], **extra: object) -> Run:
    result = make_result(source, **extra)
    segmentation = build_segmentation(result)
    return result, segmentation, build_sr(result, segmentation)


def _kos(run: Run) -> hd.ko.KeyObjectSelectionDocument:
    result, segmentation, sr = run
    return build_key_object_selection(
        result, segmentation, sr, key_slices(result), series_number=KOS_SERIES_NUMBER
    )


def _rejected(run: Run) -> list[InstanceReference]:
    """The run's SEG and SR as a caller knows them from its records: UIDs and kind."""
    _, segmentation, sr = run
    assert segmentation is not None
    return [
        InstanceReference(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            series_instance_uid=segmentation.SeriesInstanceUID,
            image=True,
        ),
        InstanceReference(
            sop_class_uid=sr.SOPClassUID,
            sop_instance_uid=sr.SOPInstanceUID,
            series_instance_uid=sr.SeriesInstanceUID,
            image=False,
        ),
    ]


def _rejection(
    source: list[Dataset], rejected: list[InstanceReference], superseding: AlgorithmIdentity
) -> hd.ko.KeyObjectSelectionDocument:
    return build_rejection_note(
        study_uid=source[0].StudyInstanceUID,
        model_name=superseding.name,
        model_version=superseding.version,
        rejected=rejected,
        header=source[0],
        series_number=REJECTION_SERIES_NUMBER,
    )


def _code(sequence: Dataset) -> tuple[str, str, str]:
    item = sequence.ConceptNameCodeSequence[0]
    return item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning


def _content_references(document: Dataset) -> set[tuple[str, str, str]]:
    """(value type, SOP class, SOP instance) of each reference in the content tree."""
    return {
        (
            item.ValueType,
            item.ReferencedSOPSequence[0].ReferencedSOPClassUID,
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
        )
        for item in document.ContentSequence
        if "ReferencedSOPSequence" in item
    }


def _evidence(document: Dataset) -> set[tuple[str, str, str]]:
    """(series, SOP class, SOP instance) of each instance of the evidence, all in its study."""
    assert "PertinentOtherEvidenceSequence" not in document
    (study,) = document.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == document.StudyInstanceUID
    return {
        (
            series.SeriesInstanceUID,
            reference.ReferencedSOPClassUID,
            reference.ReferencedSOPInstanceUID,
        )
        for series in study.ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    }


def _roundtrip(document: Dataset) -> Dataset:
    buffer = BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _assert_same_patient_and_study(document: Dataset, source: Dataset) -> None:
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
    ):
        assert document[keyword].value == source[keyword].value, keyword


# dciodvfy: zero errors, warnings allowed (as for the SEG and SR).


@pytest.mark.parametrize(
    "make_result",
    [positive_result, negative_result, located_result],
    ids=["positive", "negative", "located"],
)
def test_key_object_selection_has_no_dciodvfy_errors(
    make_result: Callable[[list[Dataset]], ResultInput], tmp_path: Path
) -> None:
    assert _dciodvfy_errors(_kos(_run(make_result, make_ct_series())), tmp_path / "kos.dcm") == []


def test_rejection_note_has_no_dciodvfy_errors(tmp_path: Path) -> None:
    source = make_ct_series()
    note = _rejection(source, _rejected(_run(positive_result, source)), SUPERSEDING)
    assert _dciodvfy_errors(note, tmp_path / "rejection.dcm") == []


def test_a_key_object_selection_without_its_evidence_does_report_errors(tmp_path: Path) -> None:
    """Guards the check above: the evidence sequence is type 1 in the Key Object Document."""
    kos = _kos(_run(positive_result, make_ct_series()))
    del kos.CurrentRequestedProcedureEvidenceSequence
    assert _dciodvfy_errors(kos, tmp_path / "broken.dcm") != []


# The key images of a run.


def test_key_slices_are_those_of_the_positive_findings() -> None:
    source = make_ct_series()
    # Segment 1 (two hemorrhages) is largest on slices 2 and 3, segment 2 equal on 4 to 6:
    # the first largest slice of each; the absent edema has none.
    assert key_slices(positive_result(source)) == [source[2], source[4]]
    assert key_slices(located_result(source)) == [source[3]]  # location (2.5, ...) rounds up
    assert key_slices(negative_result(source)) == []
    # A segment decides over a centroid, as for the key image preview (workers.keyimage).
    result = positive_result(source)
    centred = [
        dataclasses.replace(finding, location=(6.0, 1.0, 1.0))
        if finding.segment_number == 2
        else finding
        for finding in result.findings
    ]
    assert key_slices(dataclasses.replace(result, findings=centred)) == [source[2], source[4]]


def test_key_object_selection_references_exactly_key_slices_seg_and_sr() -> None:
    source = make_ct_series()
    run = _run(positive_result, source)
    _, segmentation, sr = run
    assert segmentation is not None
    kos = _kos(run)

    assert kos.SOPClassUID == KEY_OBJECT_SELECTION_STORAGE
    assert kos.Modality == "KO"
    assert _code(kos) == OF_INTEREST
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    description = [
        item for item in kos.ContentSequence if item.ValueType == "TEXT" and "TextValue" in item
    ]
    assert any(_code(item) == KEY_OBJECT_DESCRIPTION for item in description)
    assert any(ALGORITHM.name in item.TextValue for item in description)

    # In the source study, in a series of its own.
    _assert_same_patient_and_study(kos, source[0])
    assert kos.SeriesNumber == KOS_SERIES_NUMBER
    others = {source[0].SeriesInstanceUID, segmentation.SeriesInstanceUID, sr.SeriesInstanceUID}
    assert kos.SeriesInstanceUID not in others

    keys = [source[2], source[4]]
    ct = source[0].SOPClassUID
    assert _content_references(kos) == {
        *(("IMAGE", ct, key.SOPInstanceUID) for key in keys),
        ("IMAGE", SEGMENTATION_STORAGE, segmentation.SOPInstanceUID),
        ("COMPOSITE", COMPREHENSIVE_3D_SR_STORAGE, sr.SOPInstanceUID),
    }
    assert _evidence(kos) == {
        *((source[0].SeriesInstanceUID, ct, key.SOPInstanceUID) for key in keys),
        (segmentation.SeriesInstanceUID, SEGMENTATION_STORAGE, segmentation.SOPInstanceUID),
        (sr.SeriesInstanceUID, COMPREHENSIVE_3D_SR_STORAGE, sr.SOPInstanceUID),
    }


def test_key_object_selection_names_the_algorithm() -> None:
    kos = _kos(_run(positive_result, make_ct_series()))

    (algorithm,) = [
        item
        for item in kos.ContributingEquipmentSequence
        if (
            item.PurposeOfReferenceCodeSequence[0].CodeValue,
            item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator,
        )
        == PROCESSING_ALGORITHM
    ]
    assert algorithm.ManufacturerModelName == ALGORITHM.name
    assert algorithm.SoftwareVersions == ALGORITHM.version
    assert algorithm.DeviceUID == ALGORITHM.device_uid
    # The algorithm is the device observer that selected the objects (TID 1002, 1004).
    observer = {
        item.ConceptNameCodeSequence[0].CodeValue: item
        for item in kos.ContentSequence
        if item.RelationshipType == "HAS OBS CONTEXT"
    }
    assert observer["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    observer_uid = observer["121012"].UID  # Device Observer UID
    assert observer_uid == ALGORITHM.device_uid


def test_a_negative_run_selects_its_sr_alone() -> None:
    run = _run(negative_result, make_ct_series())
    assert _content_references(_kos(run)) == {
        ("COMPOSITE", COMPREHENSIVE_3D_SR_STORAGE, run[2].SOPInstanceUID)
    }


def test_key_object_selection_refuses_another_studys_slice() -> None:
    result, segmentation, sr = _run(positive_result, make_ct_series())
    stranger = make_ct_series()[0]
    with pytest.raises(ValueError, match="another study"):
        build_key_object_selection(result, segmentation, sr, [stranger], series_number=9903)


# The rejection note of an earlier run's results.


def test_rejection_note_rejects_exactly_the_given_objects() -> None:
    source = make_ct_series()
    run = _run(positive_result, source)
    _, segmentation, sr = run
    assert segmentation is not None
    note = _rejection(source, _rejected(run), SUPERSEDING)

    assert note.SOPClassUID == KEY_OBJECT_SELECTION_STORAGE
    assert note.Modality == "KO"
    assert _code(note) == REJECTED_FOR_QUALITY_REASONS
    assert note.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    assert _content_references(note) == {
        ("IMAGE", SEGMENTATION_STORAGE, segmentation.SOPInstanceUID),
        ("COMPOSITE", COMPREHENSIVE_3D_SR_STORAGE, sr.SOPInstanceUID),
    }
    assert _evidence(note) == {
        (segmentation.SeriesInstanceUID, SEGMENTATION_STORAGE, segmentation.SOPInstanceUID),
        (sr.SeriesInstanceUID, COMPREHENSIVE_3D_SR_STORAGE, sr.SOPInstanceUID),
    }
    # IOCM: in the study of the rejected instances, in a new series.
    _assert_same_patient_and_study(note, source[0])
    assert note.SeriesNumber == REJECTION_SERIES_NUMBER
    rejected_series = {segmentation.SeriesInstanceUID, sr.SeriesInstanceUID}
    assert note.SeriesInstanceUID not in {*rejected_series, source[0].SeriesInstanceUID}
    # What a caller's records say is what the objects themselves say.
    assert _rejected(run) == [InstanceReference.of(segmentation), InstanceReference.of(sr)]


def test_rejection_note_takes_what_a_sparse_header_has() -> None:
    source = make_ct_series()
    header = copy.deepcopy(source[0])
    for keyword in ("AccessionNumber", "PatientBirthDate", "StudyID", "ReferringPhysicianName"):
        del header[keyword]
    note = build_rejection_note(
        study_uid=header.StudyInstanceUID,
        model_name=SUPERSEDING.name,
        model_version=SUPERSEDING.version,
        rejected=_rejected(_run(positive_result, source)),
        header=header,
        series_number=REJECTION_SERIES_NUMBER,
    )
    assert note.PatientID == header.PatientID
    assert not note.AccessionNumber  # type 2: present, empty


def test_rejection_note_refuses_a_header_of_another_study() -> None:
    source = make_ct_series()
    rejected = _rejected(_run(positive_result, source))
    with pytest.raises(ValueError, match="study"):
        build_rejection_note(
            study_uid=source[0].StudyInstanceUID,
            model_name=SUPERSEDING.name,
            model_version=SUPERSEDING.version,
            rejected=rejected,
            header=make_ct_series()[0],
            series_number=REJECTION_SERIES_NUMBER,
        )


def test_rejection_note_refuses_to_reject_nothing_or_itself() -> None:
    source = make_ct_series()
    with pytest.raises(ValueError, match="nothing"):
        _rejection(source, [], SUPERSEDING)
    note = _rejection(source, _rejected(_run(positive_result, source)), SUPERSEDING)
    with pytest.raises(ValueError, match="itself"):
        _rejection(source, [InstanceReference.of(note)], SUPERSEDING)


def test_instance_reference_checks_its_uids() -> None:
    with pytest.raises(ValueError, match="sop_instance_uid"):
        InstanceReference(
            sop_class_uid=SEGMENTATION_STORAGE,
            sop_instance_uid="1.2.not-a-uid",
            series_instance_uid="1.2.3",
            image=True,
        )


# Deterministic UIDs, and a faithful encoding.


def test_uids_are_stable_and_differ_between_model_versions() -> None:
    source = make_ct_series()
    first, again = _run(positive_result, source), _run(positive_result, source)
    other = _run(positive_result, source, algorithm=SUPERSEDING)
    kos, kos_again, other_kos = _kos(first), _kos(again), _kos(other)
    assert (kos.SeriesInstanceUID, kos.SOPInstanceUID) == (
        kos_again.SeriesInstanceUID,
        kos_again.SOPInstanceUID,
    )
    assert other_kos.SeriesInstanceUID != kos.SeriesInstanceUID
    assert other_kos.SOPInstanceUID != kos.SOPInstanceUID
    assert kos.SOPInstanceUID not in {obj.SOPInstanceUID for obj in first[1:] if obj is not None}

    rejected = _rejected(first)
    note = _rejection(source, rejected, SUPERSEDING)
    note_again = _rejection(source, rejected, SUPERSEDING)
    later = AlgorithmIdentity(name=ALGORITHM.name, version="1.2.0")
    other_note = _rejection(source, rejected, later)
    assert (note.SeriesInstanceUID, note.SOPInstanceUID) == (
        note_again.SeriesInstanceUID,
        note_again.SOPInstanceUID,
    )
    assert other_note.SeriesInstanceUID != note.SeriesInstanceUID
    assert other_note.SOPInstanceUID != note.SOPInstanceUID
    assert note.SOPInstanceUID != other_kos.SOPInstanceUID  # same run, another object
    assert note.SeriesInstanceUID != other_kos.SeriesInstanceUID


def test_both_round_trip_through_pydicom() -> None:
    source = make_ct_series()
    run = _run(positive_result, source)
    for built in (_kos(run), _rejection(source, _rejected(run), SUPERSEDING)):
        read = _roundtrip(built)
        assert read.file_meta.MediaStorageSOPClassUID == KEY_OBJECT_SELECTION_STORAGE
        assert read.file_meta.MediaStorageSOPInstanceUID == built.SOPInstanceUID
        assert read.SOPInstanceUID == built.SOPInstanceUID
        assert read.SeriesInstanceUID == built.SeriesInstanceUID
        assert _code(read) == _code(built)
        assert _content_references(read) == _content_references(built)
        assert _evidence(read) == _evidence(built)
        _assert_same_patient_and_study(read, source[0])
        # highdicom reads it back as a Key Object Selection, and resolves each reference.
        document = hd.ko.KeyObjectSelectionDocument.from_dataset(read)
        for item in document.content.get_references():
            study_uid, _, instance_uid = document.resolve_reference(
                item.referenced_sop_instance_uid
            )
            assert study_uid == source[0].StudyInstanceUID
            assert instance_uid == item.referenced_sop_instance_uid
