"""workers.volume.load_volume against pydicom: voxels bit for bit, spacing, flips, header order.

The expected volume is computed here with plain pydicom (``dcmread(path).pixel_array``, rescaled
in float32 as the loader has always done it, sorted by position, flipped where the image axes
run towards the patient's right or anterior), never with the loader's own code. Each series is a
few small slices (33 x 37 pixels: odd, so 8-bit pixel data is padded) in many encodings.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import workers.volume
from tests.helpers.ct_series import make_ct_series
from triage.errors import PermanentError
from workers.volume import Volume, load_volume

SLICES, ROWS, COLUMNS = 6, 33, 37
SLICE_MM, ROW_MM, COLUMN_MM = 5.0, 0.7, 0.9
AXIAL = (1, 0, 0, 0, 1, 0)


@dataclass(frozen=True)
class Case:
    """One series: how its pixels are stored and encoded, and in which order it is given."""

    syntax: UID = ExplicitVRLittleEndian
    bits_allocated: int = 16
    bits_stored: int = 16
    signed: bool = False
    junk_bits: bool = True  # random values in the bits above Bits Stored (pydicom ignores them)
    slopes: tuple[float, ...] = (1.0,)  # one per slice, or one for all
    intercepts: tuple[float, ...] = (0.0,)
    orientation: tuple[int, ...] = AXIAL
    photometric: str = "MONOCHROME2"
    order: str = "sorted"  # the order the paths are given in: sorted, reversed or shuffled
    encode: dict[str, Any] = field(default_factory=dict)  # Dataset.compress options
    edit: Callable[[int, Dataset], None] | None = None  # a last change to slice i
    by_pydicom: bool = False  # pydicom reads the pixels (compressed and unusual data)


def _trailing_padding(index: int, ds: Dataset) -> None:
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 6)  # Data Set Trailing Padding, after Pixel Data


def _excess_pixel_data(index: int, ds: Dataset) -> None:
    ds.PixelData = ds.PixelData + b"\0" * 4  # pydicom ignores what follows the image


def _big_endian_ow(index: int, ds: Dataset) -> None:
    ds["PixelData"].VR = "OW"  # 8-bit values in 16-bit words: pydicom swaps each byte pair


def _every_other_rle(index: int, ds: Dataset) -> None:
    if index % 2:
        ds.compress(RLELossless)


CASES = {
    "unsigned 12-bit, intercept -1024": Case(bits_stored=12, intercepts=(-1024.0,)),
    "signed 16-bit": Case(signed=True),
    "signed 12-bit (negative values)": Case(bits_stored=12, signed=True, intercepts=(-1024.0,)),
    "unsigned 8-bit, odd length": Case(bits_allocated=8, bits_stored=8),
    "signed 8-bit, 6 bits stored": Case(bits_allocated=8, bits_stored=6, signed=True),
    "unsigned 32-bit, beyond float32's integers": Case(bits_allocated=32, bits_stored=32),
    "signed 32-bit, 20 bits stored": Case(bits_allocated=32, bits_stored=20, signed=True),
    "big endian, signed 12-bit": Case(
        syntax=ExplicitVRBigEndian, bits_stored=12, signed=True, intercepts=(-1024.0,)
    ),
    "big endian, 8-bit OB": Case(syntax=ExplicitVRBigEndian, bits_allocated=8, bits_stored=8),
    "big endian, 8-bit OW": Case(
        syntax=ExplicitVRBigEndian,
        bits_allocated=8,
        bits_stored=8,
        edit=_big_endian_ow,
        by_pydicom=True,
    ),
    "implicit VR, unsigned 12-bit": Case(
        syntax=ImplicitVRLittleEndian, bits_stored=12, intercepts=(-1024.0,)
    ),
    "deflated": Case(syntax=DeflatedExplicitVRLittleEndian, signed=True, by_pydicom=True),
    "slope and intercept per slice": Case(
        signed=True,
        bits_stored=12,
        slopes=(1.0, 0.5, 2.7, 1.0, 0.1, 3.0),
        intercepts=(-1024.0, -1000.5, 0.0, 7.3, -1024.0, -3.0),
    ),
    "MONOCHROME1": Case(bits_stored=12, photometric="MONOCHROME1"),
    "excess pixel data": Case(bits_stored=12, edit=_excess_pixel_data),
    "an element after Pixel Data": Case(bits_stored=12, edit=_trailing_padding, by_pydicom=True),
    "RLE lossless": Case(syntax=RLELossless, bits_stored=12, junk_bits=False, by_pydicom=True),
    "RLE lossless, signed": Case(syntax=RLELossless, signed=True, junk_bits=False, by_pydicom=True),
    "JPEG-LS lossless, signed 12-bit": Case(
        syntax=JPEGLSLossless,
        bits_stored=12,
        signed=True,
        junk_bits=False,
        intercepts=(-1024.0,),
        by_pydicom=True,
    ),
    "JPEG-LS near-lossless": Case(
        syntax=JPEGLSNearLossless,
        bits_stored=12,
        junk_bits=False,
        encode={"jls_error": 3},
        by_pydicom=True,
    ),
    "JPEG 2000 lossless": Case(
        syntax=JPEG2000Lossless, bits_stored=12, signed=True, junk_bits=False, by_pydicom=True
    ),
    "uncompressed and RLE mixed": Case(bits_stored=12, junk_bits=False, edit=_every_other_rle),
    "reversed": Case(bits_stored=12, order="reversed"),
    "shuffled": Case(bits_stored=12, order="shuffled"),
    "prone: rows and columns flipped": Case(bits_stored=12, orientation=(-1, 0, 0, 0, -1, 0)),
    "normal towards the feet, rows flipped": Case(
        bits_stored=12, orientation=(1, 0, 0, 0, -1, 0), order="shuffled"
    ),
    "normal towards the feet, columns flipped": Case(
        bits_stored=12, orientation=(-1, 0, 0, 0, 1, 0)
    ),
}


def _stored_values(case: Case, rng: np.random.Generator) -> npt.NDArray[Any]:
    """Random stored values (full range of Bits Stored) as the file holds them: unsigned words,
    two's complement, with junk in the unused high bits when the case asks for it."""
    low, high = (-(2 ** (case.bits_stored - 1)), 2 ** (case.bits_stored - 1))
    if not case.signed:
        low, high = 0, 2**case.bits_stored
    values = rng.integers(low, high, size=(ROWS, COLUMNS), dtype=np.int64)
    if case.syntax.is_encapsulated:  # noise from end to end would not compress: a noisy ramp
        ramp = np.linspace(low, high - 1, ROWS * COLUMNS).astype(np.int64).reshape(ROWS, COLUMNS)
        values = np.clip(ramp + rng.integers(-3, 4, size=ramp.shape), low, high - 1)
    words = values & ((1 << case.bits_stored) - 1)
    if case.signed and not case.junk_bits:  # sign-extended, as encoders want it
        words = values & ((1 << case.bits_allocated) - 1)
    if case.junk_bits and case.bits_stored < case.bits_allocated:
        unused = case.bits_allocated - case.bits_stored
        words |= rng.integers(0, 2**unused, size=words.shape, dtype=np.int64) << case.bits_stored
    return words.astype(f"u{case.bits_allocated // 8}")


def _per_slice(values: tuple[float, ...], index: int) -> float:
    return values[index] if len(values) > 1 else values[0]


def write_series(directory: Path, case: Case, seed: int = 0) -> list[Path]:
    """The case's series as one file per slice, the paths in the case's order."""
    rng = np.random.default_rng(seed)
    paths = []
    for index, ds in enumerate(make_ct_series(slices=SLICES, rows=ROWS, columns=COLUMNS)):
        ds.BitsAllocated = case.bits_allocated
        ds.BitsStored = case.bits_stored
        ds.HighBit = case.bits_stored - 1
        ds.PixelRepresentation = int(case.signed)
        ds.PhotometricInterpretation = case.photometric
        ds.RescaleSlope = _per_slice(case.slopes, index)
        ds.RescaleIntercept = _per_slice(case.intercepts, index)
        ds.ImageOrientationPatient = list(case.orientation)
        ds.PixelSpacing = [ROW_MM, COLUMN_MM]
        ds.ImagePositionPatient = [-10.0, 20.0, 100.0 + index * SLICE_MM]
        words = _stored_values(case, rng)
        big_endian = case.syntax == ExplicitVRBigEndian
        ds.PixelData = words.astype(words.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
        if case.syntax.is_compressed and case.syntax != DeflatedExplicitVRLittleEndian:
            ds.compress(case.syntax, **case.encode)
        else:
            ds.file_meta.TransferSyntaxUID = case.syntax
        if case.edit is not None:
            case.edit(index, ds)
        path = directory / f"slice{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    if case.order == "reversed":
        paths.reverse()
    elif case.order == "shuffled":
        random.Random(seed).shuffle(paths)
    return paths


def expected_volume(paths: list[Path]) -> tuple[npt.NDArray[np.float32], list[Dataset]]:
    """Plain pydicom: pixel_array in float32 times slope plus intercept, slices from feet to
    head, rows from anterior to posterior, columns from the patient's right to left."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom on excess pixel data
        datasets: list[Dataset] = [dcmread(path) for path in paths]
        images = {id(ds): ds.pixel_array for ds in datasets}
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    slices = []
    for ds in datasets:
        slope, intercept = np.float32(ds.RescaleSlope), np.float32(ds.RescaleIntercept)
        image = images[id(ds)].astype(np.float32) * slope + intercept
        row_direction, column_direction = (
            ds.ImageOrientationPatient[:3],
            ds.ImageOrientationPatient[3:],
        )
        if row_direction[0] < 0:  # columns run towards the patient's right
            image = image[:, ::-1]
        if column_direction[1] < 0:  # rows run towards anterior
            image = image[::-1, :]
        slices.append(image)
        del ds.PixelData
    return np.ascontiguousarray(np.stack(slices)), datasets


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SOP Instance UIDs of the files whose pixels pydicom decoded in load_volume."""
    calls: list[str] = []

    def counting(ds: Dataset, **options: Any) -> npt.NDArray[Any]:
        calls.append(str(ds.SOPInstanceUID))
        result: npt.NDArray[Any] = pixel_array(ds, **options)
        return result

    monkeypatch.setattr(workers.volume, "pixel_array", counting)
    return calls


def assert_same(volume: Volume, expected: npt.NDArray[np.float32], headers: list[Dataset]) -> None:
    assert volume.voxels.dtype == np.float32
    assert volume.voxels.shape == expected.shape
    assert np.array_equal(volume.voxels.view(np.uint32), expected.view(np.uint32))  # bit for bit
    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == [
        str(ds.SOPInstanceUID) for ds in headers
    ]
    for ds, expected_ds in zip(volume.datasets, headers, strict=True):
        assert "PixelData" not in ds
        assert ds == expected_ds
        assert ds.file_meta == expected_ds.file_meta


@pytest.mark.parametrize("name", list(CASES))
def test_volume_is_pydicoms_pixels_rescaled_and_oriented(
    name: str, tmp_path: Path, decodes: list[str]
) -> None:
    case = CASES[name]
    paths = write_series(tmp_path, case)
    expected, headers = expected_volume(paths)

    volume = load_volume(paths)

    assert_same(volume, expected, headers)
    assert volume.spacing_mm == (SLICE_MM, ROW_MM, COLUMN_MM)
    flips = (case.orientation[4] < 0, case.orientation[0] < 0)
    assert volume.in_plane_flips == flips
    assert volume.series_uid == str(headers[0].SeriesInstanceUID)
    # Each file decoded at most once, and by pydicom only where it must.
    assert len(decodes) == len(set(decodes))
    if case.by_pydicom:
        assert len(decodes) == SLICES
    elif case.edit is not _every_other_rle:
        assert decodes == []


def test_mixed_series_decodes_only_its_compressed_files(tmp_path: Path, decodes: list[str]) -> None:
    paths = write_series(tmp_path, CASES["uncompressed and RLE mixed"])
    load_volume(paths)
    compressed = [
        str(ds.SOPInstanceUID)
        for ds in map(dcmread, paths)
        if ds.file_meta.TransferSyntaxUID == RLELossless
    ]
    assert sorted(decodes) == sorted(compressed)
    assert len(compressed) == SLICES // 2


def test_projection_radiograph_is_one_plane(tmp_path: Path) -> None:
    ds = make_ct_series(slices=1, rows=ROWS, columns=COLUMNS)[0]
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.Modality = "DX"
    ds.PixelSpacing = [ROW_MM, COLUMN_MM]
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -3
    ds.PixelData = (np.arange(ROWS * COLUMNS, dtype=np.int16) - 9).tobytes()
    path = tmp_path / "dx.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = dcmread(path)
    expected = read.pixel_array.astype(np.float32) * np.float32(0.5) + np.float32(-3)
    del read.PixelData

    volume = load_volume([path])

    assert_same(volume, expected[None], [read])
    assert volume.spacing_mm == (1.0, ROW_MM, COLUMN_MM)
    assert volume.in_plane_flips == (False, False)


def _one_position(index: int, ds: Dataset) -> None:
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]


def _irregular_spacing(index: int, ds: Dataset) -> None:
    ds.ImagePositionPatient = [0.0, 0.0, float(index * index)]


def _one_without_orientation(index: int, ds: Dataset) -> None:
    if index == 2:
        del ds.ImageOrientationPatient


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_one_position, "duplicate"),
        (_irregular_spacing, "irregular"),
        (_one_without_orientation, "lacks"),
    ],
    ids=["duplicate positions", "irregular spacing", "no orientation"],
)
def test_series_without_usable_geometry_is_refused(
    tmp_path: Path, edit: Callable[[int, Dataset], None], reason: str
) -> None:
    paths = write_series(tmp_path, Case(bits_stored=12, edit=edit))
    with pytest.raises(PermanentError, match=reason):
        load_volume(paths)


def test_slices_of_different_sizes_are_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, Case(bits_stored=12))
    ds = dcmread(paths[3])
    ds.Rows = ROWS - 1
    ds.PixelData = ds.PixelData[: (ROWS - 1) * COLUMNS * 2]
    ds.save_as(paths[3], enforce_file_format=True)
    with pytest.raises(PermanentError, match="differ in size"):
        load_volume(paths)


def test_instance_without_pixel_data_fails_as_in_pydicom(tmp_path: Path) -> None:
    paths = write_series(tmp_path, Case(bits_stored=12))
    ds = dcmread(paths[2])
    del ds.PixelData
    ds.save_as(paths[2], enforce_file_format=True)
    with pytest.raises(AttributeError, match="no pixel data"):
        load_volume(paths)
