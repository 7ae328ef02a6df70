"""The reference network and its fixed pipeline: HU volume in, lesion mask, lesions and score out.

The input is resampled (with anti-aliasing) to an isotropic 2 mm grid hung from the top of the head,
windowed into a blood channel (0-100 HU) and a calcium/bone one (-100-900 HU), and segmented by a
small 3D UNet. The probability map goes back to the input grid for the mask; the study score comes
from the working grid, so it does not depend on the input's matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.networks.nets.unet import UNet
from scipy import ndimage

from workers.models.reference.resample import (
    FloatArray,
    apply_separable,
    axis_positions,
    resampling_weights,
)

HuArray = npt.NDArray[np.integer[Any] | np.floating[Any]]


@dataclass(frozen=True)
class Preprocessing:
    """Working grid and intensity windows; the sidecar records these values."""

    spacing_mm: float = 2.0
    shape: tuple[int, int, int] = (96, 112, 112)  # slices, rows, columns: 192 x 224 x 224 mm
    head_threshold_hu: float = -500.0  # above this is the head (skin and inside)
    top_margin_mm: float = 10.0  # air kept above the vertex
    fill_hu: float = -1000.0  # outside the scanned volume
    windows_hu: tuple[tuple[float, float], ...] = ((0.0, 100.0), (-100.0, 900.0))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            spacing_mm=float(values["spacing_mm"]),
            shape=(int(values["shape"][0]), int(values["shape"][1]), int(values["shape"][2])),
            head_threshold_hu=float(values["head_threshold_hu"]),
            top_margin_mm=float(values["top_margin_mm"]),
            fill_hu=float(values["fill_hu"]),
            windows_hu=tuple((float(lo), float(hi)) for lo, hi in values["windows_hu"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Postprocessing:
    """How probabilities become a mask, lesions and a study score."""

    mask_threshold: float = 0.5
    score_volume_ml: float = 0.5  # the score is the mean of the top probabilities over this volume
    min_lesion_ml: float = 0.05  # smaller connected components are dropped

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Postprocessing:
        return cls(
            mask_threshold=float(values["mask_threshold"]),
            score_volume_ml=float(values["score_volume_ml"]),
            min_lesion_ml=float(values["min_lesion_ml"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PREPROCESSING = Preprocessing()
POSTPROCESSING = Postprocessing()


@dataclass(frozen=True)
class DetectedLesion:
    """One connected component of the mask, on the input grid."""

    volume_ml: float
    centroid_voxel: tuple[float, float, float]  # (slice, row, column), fractional
    max_probability: float


@dataclass(frozen=True, eq=False)
class Prediction:
    """Mask on the input grid (uint8), its lesions largest first, and the study probability."""

    mask: npt.NDArray[np.uint8]
    lesions: list[DetectedLesion]
    study_probability: float


@dataclass(frozen=True)
class WorkingGrid:
    """Where the working grid lies in the input: per axis, input-to-working resampling weights."""

    to_working: tuple[FloatArray, FloatArray, FloatArray]
    to_input: tuple[FloatArray, FloatArray, FloatArray]


def build_network() -> UNet:
    """The 3D UNet; it outputs logits, one channel. BatchNorm, so that in eval mode the network
    is the same function on training crops and on the whole working grid."""
    return UNet(
        spatial_dims=3,
        in_channels=len(PREPROCESSING.windows_hu),
        out_channels=1,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=0,
        norm="batch",
    )


class ProbabilityNetwork(torch.nn.Module):
    """What ships: the UNet's probabilities averaged with those of the left-right mirrored input.

    Heads are nearly symmetric, so the mirrored pass is a second opinion that damps spurious
    detections; inside the TorchScript file, every caller gets it.
    """

    def __init__(self, logits: torch.nn.Module) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mirrored = self.logits(x.flip(-1)).flip(-1)
        return (torch.sigmoid(self.logits(x)) + torch.sigmoid(mirrored)) / 2


def working_grid(
    hu: HuArray,
    spacing_mm: tuple[float, float, float],
    preprocessing: Preprocessing = PREPROCESSING,
) -> WorkingGrid:
    """Place the working grid: its top `top_margin_mm` above the vertex, centred on the head."""
    strides = [max(1, int(4.0 // s)) for s in spacing_mm]
    coarse = hu[:: strides[0], :: strides[1], :: strides[2]] > preprocessing.head_threshold_hu
    size = preprocessing.spacing_mm
    extent = [(n - 1) * size for n in preprocessing.shape]
    occupied = np.flatnonzero(coarse.any(axis=(1, 2)))
    if occupied.size == 0:
        centre = [(n - 1) * s / 2 for n, s in zip(hu.shape, spacing_mm, strict=True)]
        first = [c - e / 2 for c, e in zip(centre, extent, strict=True)]
    else:
        top = occupied[-1] * strides[0] * spacing_mm[0] + preprocessing.top_margin_mm
        bottom_index = math.ceil((top - extent[0]) / (strides[0] * spacing_mm[0]))
        rows, cols = np.nonzero(coarse[max(bottom_index, 0) :])[1:]
        first = [top - extent[0]] + [
            float(indices.mean()) * stride * spacing - half
            for indices, stride, spacing, half in (
                (rows, strides[1], spacing_mm[1], extent[1] / 2),
                (cols, strides[2], spacing_mm[2], extent[2] / 2),
            )
        ]
    to_working, to_input = [], []
    for count, spacing, work_count, start in zip(
        hu.shape, spacing_mm, preprocessing.shape, first, strict=True
    ):
        source = axis_positions(count, spacing)
        target = axis_positions(work_count, size, start)
        to_working.append(resampling_weights(source, target, spacing, size))
        to_input.append(resampling_weights(target, source, size, spacing))
    return WorkingGrid(
        to_working=(to_working[0], to_working[1], to_working[2]),
        to_input=(to_input[0], to_input[1], to_input[2]),
    )


def network_input(
    hu: HuArray,
    grid: WorkingGrid,
    preprocessing: Preprocessing = PREPROCESSING,
) -> FloatArray:
    """The windowed channels on the working grid, shape (channels, *preprocessing.shape)."""
    fill = preprocessing.fill_hu
    working = apply_separable(np.asarray(hu, np.float32) - fill, grid.to_working) + fill
    return np.stack(
        [np.clip((working - lo) / (hi - lo), 0, 1) for lo, hi in preprocessing.windows_hu]
    ).astype(np.float32)


def study_probability(
    probability: FloatArray, spacing_mm: float, postprocessing: Postprocessing
) -> float:
    """Mean of the highest working-grid probabilities over `score_volume_ml` of tissue."""
    voxel_ml = spacing_mm**3 / 1000
    count = max(1, math.ceil(postprocessing.score_volume_ml / voxel_ml))
    top = np.partition(probability.ravel(), -count)[-count:]
    return float(top.mean())


def predict(
    hu: HuArray,
    spacing_mm: tuple[float, float, float],
    net: torch.nn.Module,
    device: torch.device,
    *,
    preprocessing: Preprocessing = PREPROCESSING,
    postprocessing: Postprocessing = POSTPROCESSING,
) -> Prediction:
    """Run the network on one HU volume (slices, rows, columns) with its spacing in mm."""
    grid = working_grid(hu, spacing_mm, preprocessing)
    inputs = torch.from_numpy(network_input(hu, grid, preprocessing))[None].to(device)
    with torch.inference_mode():
        probability = net(inputs)[0, 0].float().cpu().numpy()
    mask, lesions = lesions_on_input(probability, grid, spacing_mm, hu.shape, postprocessing)
    score = study_probability(probability, preprocessing.spacing_mm, postprocessing)
    return Prediction(mask=mask, lesions=lesions, study_probability=score)


def lesions_on_input(
    probability: FloatArray,
    grid: WorkingGrid,
    spacing_mm: tuple[float, float, float],
    shape: tuple[int, ...],
    postprocessing: Postprocessing,
) -> tuple[npt.NDArray[np.uint8], list[DetectedLesion]]:
    """Resample probabilities to the part of the input the working grid covers; label components."""
    mask = np.zeros(shape, np.uint8)
    box = tuple(_covered(weights) for weights in grid.to_input)
    if any(part.stop <= part.start for part in box):
        return mask, []
    weights = [w[part] for w, part in zip(grid.to_input, box, strict=True)]
    upsampled = apply_separable(probability, weights)
    labels, count = ndimage.label(
        upsampled >= postprocessing.mask_threshold, structure=np.ones((3, 3, 3))
    )
    if count == 0:
        return mask, []
    # Per-component statistics from the labelled voxels only: a few thousand, not millions.
    inside = np.flatnonzero(labels)
    component = labels.ravel()[inside]
    counts = np.bincount(component, minlength=count + 1)
    voxel_ml = float(np.prod(spacing_mm)) / 1000
    volumes = counts[1:] * voxel_ml
    kept = np.arange(1, count + 1)[volumes >= postprocessing.min_lesion_ml]
    maxima = np.zeros(count + 1)
    np.maximum.at(maxima, component, upsampled.ravel()[inside])
    centres = np.stack(
        [
            np.bincount(component, weights=axis, minlength=count + 1) / np.maximum(counts, 1)
            for axis in np.unravel_index(inside, labels.shape)
        ],
        axis=1,
    )
    offset = np.array([part.start for part in box], np.float64)
    lesions = [
        DetectedLesion(
            volume_ml=float(volumes[label - 1]),
            centroid_voxel=_triple(centres[label] + offset),
            max_probability=float(maxima[label]),
        )
        for label in kept
    ]
    mask[box] = np.isin(labels, kept).astype(np.uint8)
    return mask, sorted(lesions, key=lambda lesion: -lesion.volume_ml)


def _covered(weights: FloatArray) -> slice:
    rows = np.flatnonzero(weights.sum(axis=1) > 0)
    return slice(int(rows[0]), int(rows[-1]) + 1) if rows.size else slice(0, 0)


def _triple(values: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])
