"""The SEG and SR we write pass David Clunie's dciodvfy with zero errors (warnings allowed)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.conftest import service_missing
from tests.helpers.ct_series import (
    located_result,
    make_ct_series,
    negative_result,
    positive_result,
)
from triage.results.inputs import ResultInput
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
