"""The SEG and SR we write pass David Clunie's dciodvfy with zero errors (warnings allowed)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from math import ceil, floor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from tests.conftest import service_missing
from tests.helpers.ct_series import (
    ALGORITHM,
    HEMORRHAGE,
    located_result,
    make_ct_series,
    negative_result,
    positive_result,
)
from triage.dicom.uids import tracking_uid
from triage.results.inputs import CT_HEAD, FindingInput, ResultInput
from triage.results.seg import build_segmentation
from triage.results.sr import build_sr


def _dciodvfy_errors(dataset: Dataset, path: Path) -> list[str]:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        service_missing("dciodvfy (Debian package dicom3tools)")
    assert dciodvfy is not None
    dataset.save_as(path, enforce_file_format=True)
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.parametrize(
    "make_result",
    [positive_result, negative_result, located_result],
    ids=["positive", "negative", "located"],
)
def test_seg_and_sr_have_no_dciodvfy_errors(
    make_result: Callable[[list[Dataset]], ResultInput], tmp_path: Path
) -> None:
    result = make_result(make_ct_series())
    segmentation = build_segmentation(result)
    if segmentation is not None:
        assert _dciodvfy_errors(segmentation, tmp_path / "seg.dcm") == []
    assert _dciodvfy_errors(build_sr(result, segmentation), tmp_path / "sr.dcm") == []


def test_a_broken_object_does_report_errors(tmp_path: Path) -> None:
    """Guards the parsing above: an SR without its mandatory Completion Flag is an error."""
    sr = build_sr(negative_result(make_ct_series()), None)
    del sr.CompletionFlag
    assert _dciodvfy_errors(sr, tmp_path / "broken.dcm") != []


# A long series with one small finding: the objects reference what the finding needs, no more.

SERIES_SLICES = 300
LESION_SLICES = slice(149, 152)  # three consecutive slices of 300
LOCATION = (150.5, 20.0, 30.0)  # between slices 150 and 151


def _long_series() -> list[Dataset]:
    """300 slices, headers only: the worker hands the builders no pixel data."""
    series = make_ct_series(slices=SERIES_SLICES, rows=64, columns=64)
    for ds in series:
        del ds.PixelData
    return series


def _hemorrhage(source: list[Dataset], *, positive: bool, **extra: Any) -> FindingInput:
    return FindingInput(
        label="hemorrhage",
        code=HEMORRHAGE,
        probability=0.9 if positive else 0.05,
        positive=positive,
        tracking_uid=tracking_uid(
            study_uid=source[0].StudyInstanceUID,
            model_name=ALGORITHM.name,
            model_version=ALGORITHM.version,
            finding_index=0,
        ),
        **extra,
    )


def _run(
    source: list[Dataset], finding: FindingInput, mask: npt.NDArray[np.uint8] | None
) -> ResultInput:
    return ResultInput(
        source=source,
        algorithm=ALGORITHM,
        findings=[finding],
        mask=mask,
        study_uid=source[0].StudyInstanceUID,
        procedure=CT_HEAD,
        seg_series_number=9901,
        sr_series_number=9902,
    )


def _content_references(items: Sequence[Dataset]) -> set[str]:
    """SOP Instance UIDs that SR content items reference, at any depth."""
    found: set[str] = set()
    for item in items:
        found.update(ref.ReferencedSOPInstanceUID for ref in item.get("ReferencedSOPSequence", []))
        found |= _content_references(item.get("ContentSequence", []))
    return found


def _evidence(sr: Dataset) -> set[str]:
    assert "PertinentOtherEvidenceSequence" not in sr
    return {
        reference.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    }


def test_a_small_lesion_in_a_long_series_references_only_its_slices(tmp_path: Path) -> None:
    source = _long_series()
    mask = np.zeros((len(source), 64, 64), np.uint8)
    mask[LESION_SLICES, 20:26, 30:36] = 1
    covered = {source[index].SOPInstanceUID for index in np.flatnonzero(mask.any(axis=(1, 2)))}
    assert len(covered) == 3
    result = _run(source, _hemorrhage(source, positive=True, segment_number=1), mask)

    segmentation = build_segmentation(result)
    assert segmentation is not None
    sr = build_sr(result, segmentation)

    # SEG: one frame per covered slice, and only those slices referenced (PS3.3 A.51.5, C.12.2).
    assert segmentation.NumberOfFrames == len(covered)
    derived_from = [
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in segmentation.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(derived_from) == sorted(covered)
    (series,) = segmentation.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {ref.ReferencedSOPInstanceUID for ref in series.ReferencedInstanceSequence} == covered
    assert {ref.ReferencedSOPInstanceUID for ref in segmentation.SourceImageSequence} == covered
    assert _dciodvfy_errors(segmentation, tmp_path / "seg.dcm") == []

    # SR: the segment, its slices (TID 1411) and, in the evidence, exactly those (C.17.2.3).
    expected = covered | {segmentation.SOPInstanceUID}
    assert _content_references(sr.ContentSequence) == expected
    assert _evidence(sr) == expected
    assert _dciodvfy_errors(sr, tmp_path / "sr.dcm") == []


def test_a_located_finding_in_a_long_series_references_the_slices_around_it(
    tmp_path: Path,
) -> None:
    source = _long_series()
    result = _run(source, _hemorrhage(source, positive=True, location=LOCATION), None)
    sr = build_sr(result, None)

    around = {source[index].SOPInstanceUID for index in (floor(LOCATION[0]), ceil(LOCATION[0]))}
    assert _content_references(sr.ContentSequence) == around
    assert _evidence(sr) == around
    assert _dciodvfy_errors(sr, tmp_path / "sr.dcm") == []


def test_a_negative_long_series_gets_a_small_valid_sr(tmp_path: Path) -> None:
    source = _long_series()
    sr = build_sr(_run(source, _hemorrhage(source, positive=False), None), None)

    assert _content_references(sr.ContentSequence) == set()
    # Nothing referenced, yet the sequence is required once the analysed images are known
    # (PS3.3 Table C.17-2, type 1C) and holds at least one item: one instance of the series.
    evidence = _evidence(sr)
    assert len(evidence) == 1
    assert evidence <= {ds.SOPInstanceUID for ds in source}
    assert _dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
