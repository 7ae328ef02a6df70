"""The synthetic head CT phantoms and their DICOM writer (reference model's data)."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from tests.conftest import service_missing
from workers.models.reference.phantom import (
    TEST_SEEDS,
    TRAINING_SEEDS,
    VALIDATION_SEEDS,
    acquisition_for,
    generate_phantom,
    phantom_uids,
    write_dicom_series,
)

SMALL = 96  # matrix for fast tests: the same anatomy over the same field of view


def test_same_seed_gives_the_same_phantom() -> None:
    first = generate_phantom(7, lesion=True, matrix=SMALL)
    second = generate_phantom(7, lesion=True, matrix=SMALL)
    assert np.array_equal(first.hu, second.hu)
    assert np.array_equal(first.mask, second.mask)
    assert first.lesions == second.lesions
    assert first.spacing_mm == second.spacing_mm


def test_seeds_vary_what_real_scans_vary() -> None:
    acquisitions = [acquisition_for(seed) for seed in range(40)]
    assert len({a.matrix for a in acquisitions}) >= 3
    assert {512, 256} <= {a.matrix for a in acquisitions}
    assert len({a.slice_thickness_mm for a in acquisitions}) >= 4
    for a in acquisitions:
        assert 0.4 <= a.pixel_spacing_mm <= 1.0
        assert 1.0 <= a.slice_thickness_mm <= 5.0
        assert 3 <= a.noise_sigma_hu <= 12
        assert 125 <= a.slice_count * a.slice_thickness_mm <= 190
    phantoms = [generate_phantom(seed, lesion=True, matrix=SMALL) for seed in range(6)]
    volumes = [lesion.volume_ml for p in phantoms for lesion in p.lesions]
    assert max(volumes) > 2 * min(volumes)
    assert {lesion.kind for p in phantoms for lesion in p.lesions} == {
        "intraparenchymal",
        "extra-axial",
    }


def test_native_matrix_is_what_the_acquisition_says() -> None:
    seed = next(s for s in range(100) if acquisition_for(s).matrix == 512)
    phantom = generate_phantom(seed, lesion=False)
    acquisition = acquisition_for(seed)
    assert phantom.hu.shape == (acquisition.slice_count, 512, 512)
    assert phantom.spacing_mm[1] == phantom.spacing_mm[2] == acquisition.pixel_spacing_mm
    assert phantom.hu.dtype == np.int16
    assert phantom.mask.dtype == np.uint8
    assert phantom.mask.shape == phantom.hu.shape


def test_reslicing_keeps_the_scanned_range_and_the_lesion() -> None:
    acquisition = acquisition_for(5)
    native = generate_phantom(5, lesion=True, matrix=SMALL)
    thin = generate_phantom(5, lesion=True, matrix=SMALL, slices=3 * acquisition.slice_count)
    assert thin.hu.shape == (3 * acquisition.slice_count, SMALL, SMALL)
    assert thin.spacing_mm[0] == pytest.approx(acquisition.slice_thickness_mm / 3)
    assert thin.spacing_mm[1:] == native.spacing_mm[1:]
    # The same head-to-foot range: the bottom edge of the first slice does not move.
    assert thin.first_slice_z_mm - thin.spacing_mm[0] / 2 == pytest.approx(
        native.first_slice_z_mm - native.spacing_mm[0] / 2
    )
    assert len(thin.lesions) == len(native.lesions)
    for fine, coarse in zip(thin.lesions, native.lesions, strict=True):
        assert fine.volume_ml == pytest.approx(coarse.volume_ml, rel=0.1)
        assert fine.kind == coarse.kind


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_densities_are_those_of_a_head(seed: int) -> None:
    phantom = generate_phantom(seed, lesion=True, matrix=SMALL)
    hu = phantom.hu
    assert hu.min() >= -1024
    assert abs(float(np.median(hu[:, :4, :4])) + 1000) < 15  # air in the corners
    assert 700 <= np.percentile(hu, 99.9) <= 1700  # skull
    soft = hu[(hu > 0) & (hu < 100) & (phantom.mask == 0)]
    assert 20 <= float(np.median(soft)) <= 45  # brain


@pytest.mark.parametrize("seed", [4, 5, 6, 8])
def test_lesion_mask_lies_inside_the_skull_and_is_dense(seed: int) -> None:
    phantom = generate_phantom(seed, lesion=True, matrix=SMALL)
    assert phantom.has_lesion
    lesion = phantom.mask > 0
    assert lesion.any()
    inside = np.stack([ndimage.binary_fill_holes(plane > 300) for plane in phantom.hu])
    assert (lesion & inside).sum() >= 0.99 * lesion.sum()
    assert phantom.hu[lesion].min() > -100
    assert 45 <= float(np.median(phantom.hu[lesion])) <= 110
    for spec in phantom.lesions:
        assert 0.5 <= spec.volume_ml <= 80
        assert 50 <= spec.mean_hu <= 90
        assert lesion[spec.centre_voxel] or spec.kind == "extra-axial"
    voxel_ml = float(np.prod(phantom.spacing_mm)) / 1000
    truth_ml = sum(spec.volume_ml for spec in phantom.lesions)
    assert lesion.sum() * voxel_ml == pytest.approx(truth_ml, rel=0.35)


def test_no_lesion_means_an_empty_mask() -> None:
    phantom = generate_phantom(9, lesion=False, matrix=SMALL)
    assert not phantom.has_lesion
    assert phantom.lesions == []
    assert not phantom.mask.any()


def test_seed_ranges_do_not_overlap() -> None:
    ranges = [TRAINING_SEEDS, VALIDATION_SEEDS, TEST_SEEDS]
    for a, b in itertools.pairwise(ranges):
        assert a.stop <= b.start


def test_dicom_series_round_trips(tmp_path: Path) -> None:
    phantom = generate_phantom(11, lesion=True, matrix=64)
    study_uid, series_uid = phantom_uids(11)
    paths = write_dicom_series(phantom, tmp_path / "a", study_uid=study_uid, series_uid=series_uid)
    assert len(paths) == phantom.hu.shape[0]
    datasets = sorted(
        (pydicom.dcmread(path) for path in paths),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    )
    assert np.array_equal(hu, phantom.hu)
    first, second = datasets[0], datasets[1]
    assert first.Modality == "CT"
    assert first.BodyPartExamined == "HEAD"
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(first.PixelSpacing[0]) == pytest.approx(phantom.spacing_mm[1])
    assert float(first.SliceThickness) == pytest.approx(phantom.spacing_mm[0])
    step = float(second.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    assert step == pytest.approx(phantom.spacing_mm[0], abs=1e-4)
    assert first.StudyInstanceUID == study_uid
    assert first.SeriesInstanceUID == series_uid
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1

    again = write_dicom_series(phantom, tmp_path / "b", study_uid=study_uid, series_uid=series_uid)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in again] == [
        pydicom.dcmread(p).SOPInstanceUID for p in paths
    ]
    assert phantom_uids(11) == (study_uid, series_uid)
    assert phantom_uids(12) != phantom_uids(11)


def test_dicom_slice_passes_dciodvfy(tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        service_missing("dicom3tools' dciodvfy")
    phantom = generate_phantom(13, lesion=False, matrix=64)
    study_uid, series_uid = phantom_uids(13)
    paths = write_dicom_series(phantom, tmp_path, study_uid=study_uid, series_uid=series_uid)
    result = subprocess.run(
        ["dciodvfy", str(paths[len(paths) // 2])], capture_output=True, text=True, check=False
    )
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert errors == []
