"""Synthetic head CT studies from the reference model's phantom generator, written as DICOM."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from tests.helpers.instances import SentStudy
from workers.models.reference.phantom import generate_phantom, write_dicom_series


def phantom_study(out_dir: Path, seed: int, *, lesion: bool) -> SentStudy:
    phantom = generate_phantom(seed, lesion=lesion)
    study_uid = generate_uid(entropy_srcs=[f"phantom-study-{seed}-{lesion}"])
    series_uid = generate_uid(entropy_srcs=[f"phantom-series-{seed}-{lesion}"])
    paths = write_dicom_series(phantom, out_dir, study_uid=study_uid, series_uid=series_uid)
    return SentStudy(study_uid, series_uid, paths)
