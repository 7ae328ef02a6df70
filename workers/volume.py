"""From stored instances to a volume a model can read: series choice, pixel decoding, orientation.

Canonical orientation: array axes (slice, row, column) increase towards the patient's superior,
posterior and left (DICOM's LPS, slice axis first). Spacing stays the series' own and is
reported; a model resamples as its preprocessing declares.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms.spatial.array import Orientation
from pydicom import dcmread
from pydicom.dataset import Dataset

from triage.errors import PermanentError

FloatVolume = npt.NDArray[np.float32]
# Labels spelled out: MONAI otherwise warns that its default is changing.
_ORIENT = Orientation(axcodes="LPS", labels=(("L", "R"), ("P", "A"), ("I", "S")))


@dataclass(frozen=True)
class SeriesRequirements:
    """What a model asks of its input series (the ``series`` section of its description)."""

    modalities: tuple[str, ...] = ()
    orientation: str | None = "axial"
    slice_thickness_mm: tuple[float, float] = (0.0, 10.0)
    min_slices: int = 8

    @classmethod
    def from_description(cls, values: dict[str, Any] | None) -> SeriesRequirements:
        values = values or {}
        low, high = values.get("slice_thickness_mm", (0.0, 10.0))
        return cls(
            modalities=tuple(m.upper() for m in values.get("modalities", ())),
            orientation=values.get("orientation", "axial"),
            slice_thickness_mm=(float(low), float(high)),
            min_slices=int(values.get("min_slices", 8)),
        )


@dataclass(frozen=True)
class Volume:
    """Hounsfield units (or stored values for other modalities), canonical orientation."""

    series_uid: str
    voxels: FloatVolume
    spacing_mm: tuple[float, float, float]
    datasets: list[Dataset]  # headers, one per canonical slice, in canonical order
    in_plane_flips: tuple[bool, bool] = field(default=(False, False))

    def to_source_frames(self, mask: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A canonical-grid mask laid out as the source images store their pixels."""
        axes = tuple(a for a, flipped in zip((1, 2), self.in_plane_flips, strict=True) if flipped)
        return np.flip(mask, axis=axes).copy() if axes else mask


def _normal(ds: Dataset) -> npt.NDArray[np.float64]:
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    return np.cross(orientation[:3], orientation[3:])


def describe_series(headers: Sequence[Dataset]) -> dict[str, Any]:
    """Modality, orientation and thickness of a series from its headers."""
    first = headers[0]
    orientation = None
    if "ImageOrientationPatient" in first:
        normal = _normal(first)
        axis = int(np.argmax(np.abs(normal)))
        orientation = (
            ("sagittal", "coronal", "axial")[axis] if abs(normal[axis]) > 0.8 else "oblique"
        )
    thickness = float(first.get("SliceThickness") or 0.0)
    return {
        "modality": str(first.get("Modality", "")).upper(),
        "orientation": orientation,
        "slice_thickness_mm": thickness,
        "slices": len(headers),
    }


def fits(requirements: SeriesRequirements, facts: dict[str, Any]) -> str | None:
    """None if the series fits; otherwise why not."""
    if requirements.modalities and facts["modality"] not in requirements.modalities:
        return f"modality {facts['modality'] or 'unknown'}"
    if requirements.orientation and facts["orientation"] != requirements.orientation:
        return f"orientation {facts['orientation']}"
    low, high = requirements.slice_thickness_mm
    if facts["slice_thickness_mm"] and not low <= facts["slice_thickness_mm"] <= high:
        return f"slice thickness {facts['slice_thickness_mm']} mm"
    if facts["slices"] < requirements.min_slices:
        return f"{facts['slices']} slices"
    return None


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    return [dcmread(path, stop_before_pixels=True) for path in paths]


def load_volume(paths: Sequence[Path]) -> Volume:
    """Decode one series (compressed transfer syntaxes included) into a canonical volume."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        datasets = [dcmread(path) for path in paths]
    first = datasets[0]
    if len(datasets) == 1 and "ImagePositionPatient" not in first:
        return _planar(first)
    if any(
        "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds for ds in datasets
    ):
        raise PermanentError("series lacks Image Position or Orientation (Patient)")
    normal = _normal(first)
    datasets.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    positions = np.asarray(
        [np.dot(normal, [float(v) for v in ds.ImagePositionPatient]) for ds in datasets]
    )
    gaps = np.diff(positions)
    if len(gaps) == 0 or gaps.min() <= 0:
        raise PermanentError("series has duplicate or a single slice position")
    slice_mm = float(np.median(gaps))
    if np.abs(gaps - slice_mm).max() > 0.1 * slice_mm + 0.01:
        raise PermanentError("series has irregular slice spacing")
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    stored = np.stack([_modality_values(ds) for ds in datasets])  # (slice, row, col)

    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient])
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * col_mm  # i: along a row (column index)
    affine[:3, 1] = orientation[3:] * row_mm  # j: down a column (row index)
    affine[:3, 2] = normal * slice_mm  # k: slice index
    affine[:3, 3] = [float(v) for v in first.ImagePositionPatient]
    affine[:2] *= -1  # LPS (DICOM) to RAS (MONAI)
    image = MetaTensor(
        torch.from_numpy(stored.transpose(2, 1, 0).copy())[None], affine=torch.from_numpy(affine)
    )
    oriented = cast(MetaTensor, _ORIENT(image))
    voxels = oriented.as_tensor()[0].numpy().transpose(2, 1, 0).astype(np.float32)
    flipped = [bool(np.sign(oriented.affine[a, a]) != np.sign(affine[a, a])) for a in range(3)]
    if flipped[2]:
        datasets.reverse()
    headers = [_header_only(ds) for ds in datasets]
    spacing = (slice_mm, row_mm, col_mm)
    return Volume(str(first.SeriesInstanceUID), voxels, spacing, headers, (flipped[1], flipped[0]))


def _planar(ds: Dataset) -> Volume:
    """A projection radiograph: one image, no patient geometry; kept as the detector saw it."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)
    row_mm, col_mm = (float(v) for v in spacing)
    voxels = _modality_values(ds)[None]
    return Volume(str(ds.SeriesInstanceUID), voxels, (1.0, row_mm, col_mm), [_header_only(ds)])


def _modality_values(ds: Dataset) -> npt.NDArray[np.float32]:
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def _header_only(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds
