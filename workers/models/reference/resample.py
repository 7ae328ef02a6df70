"""Separable linear resampling between axis-aligned grids, shared by the phantom and the network.

Each axis gets a small dense weight matrix (a tent kernel), applied with BLAS matrix products: this
is much faster than point-wise interpolation for the 512x512xN volumes the project handles, and the
tent widens to the coarser spacing so that downsampling averages (no aliasing) and upsampling
interpolates linearly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


def axis_positions(count: int, spacing_mm: float, first_mm: float = 0.0) -> FloatArray:
    """Centre positions (mm) of `count` samples along one axis."""
    return (first_mm + spacing_mm * np.arange(count)).astype(np.float32)


def tent_weights(source_mm: FloatArray, target_mm: FloatArray, half_width_mm: float) -> FloatArray:
    """Weights (target x source) of a tent kernel, rows normalised; all-zero rows lie outside."""
    distance = np.abs(target_mm[:, None] - source_mm[None, :])
    weights = np.clip(1.0 - distance / half_width_mm, 0.0, None)
    totals = weights.sum(axis=1, keepdims=True)
    return np.asarray(
        np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0), np.float32
    )


def resampling_weights(
    source_mm: FloatArray, target_mm: FloatArray, source_spacing_mm: float, target_spacing_mm: float
) -> FloatArray:
    """Tent weights whose half-width is the coarser of the two spacings."""
    return tent_weights(source_mm, target_mm, max(source_spacing_mm, target_spacing_mm))


def apply_separable(
    volume: npt.NDArray[np.generic], weights: Sequence[FloatArray | None]
) -> FloatArray:
    """Apply one (target x source) matrix per axis of a 3D volume (None: leave the axis alone).

    Axes that shrink most go first, so the larger products work on the smaller arrays.
    """
    out = np.asarray(volume, dtype=np.float32)
    present = [(axis, matrix) for axis, matrix in enumerate(weights) if matrix is not None]
    for axis, matrix in sorted(present, key=lambda item: item[1].shape[0] / item[1].shape[1]):
        moved = np.moveaxis(out, axis, -1)
        flat = moved.reshape(-1, moved.shape[-1]) @ matrix.T
        out = np.moveaxis(flat.reshape((*moved.shape[:-1], matrix.shape[0])), -1, axis)
    return np.ascontiguousarray(out)
