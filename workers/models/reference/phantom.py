"""Synthetic non-contrast head CT phantoms with hemorrhage-like hyperdense lesions.

The reference model is trained and measured on these, never on patient data. A phantom is a scalp,
a skull (two tables and diploe), a skull base with bone and air cells, brain with grey and white
matter, sulci, ventricles, falx and optional calcifications (pineal, choroid plexus; the usual
false-positive bait), plus optionally one or two lesions: an intraparenchymal blob or an extra-axial
(subdural- or epidural-like) collection along the inner table, 50-90 HU.

Geometry is analytic (signed depths below an ellipsoidal head with an irregular outline), so any
grid can be rendered with partial-volume edges; smooth textures come from coarse random fields.
Fine matrices are rendered at about 0.9 mm and interpolated, then noise is added at full resolution.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DSfloat
from scipy import ndimage

from workers.models.reference.resample import (
    FloatArray,
    apply_separable,
    axis_positions,
    resampling_weights,
)

RealArray = npt.NDArray[np.floating[Any]]

# Seed ranges, kept apart so that no test or threshold is ever chosen on training data.
TRAINING_SEEDS = range(0, 50_000)
VALIDATION_SEEDS = range(50_000, 100_000)
TEST_SEEDS = range(100_000, 200_000)

HU_MIN, HU_MAX = -1024, 3071
AIR_HU = -1000.0
RENDER_SPACING_MM = 0.9  # finest in-plane spacing rendered; finer matrices are interpolated
SUB_SLICE_MM = 1.25  # thick slices average sub-slices this far apart (the slice profile)
FIELD_SPACING_MM = 4.0  # lattice of the coarse random texture fields
PLANES_PER_CHUNK = 300_000  # voxels rendered per vectorised chunk of sub-slices

RESCALE_INTERCEPT = -1024  # stored pixel = HU + 1024, unsigned 12 bits
STUDY_DATE, STUDY_TIME = "20250101", "120000"

LesionKind = Literal["intraparenchymal", "extra-axial"]


@dataclass(frozen=True)
class LesionSpec:
    """Ground truth of one lesion: its kind, centre voxel, volume (partial-volume weighted)."""

    kind: LesionKind
    centre_voxel: tuple[int, int, int]
    volume_ml: float
    mean_hu: float


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic axial head CT: HU volume (slices from feet to head) and lesion truth."""

    seed: int
    hu: npt.NDArray[np.int16]
    spacing_mm: tuple[float, float, float]
    mask: npt.NDArray[np.uint8]
    lesions: list[LesionSpec]
    first_slice_z_mm: float = 0.0

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesions)


@dataclass(frozen=True)
class Acquisition:
    """How the phantom is scanned: matrix, spacings, slice count, noise."""

    matrix: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    slice_count: int
    first_slice_z_mm: float
    noise_sigma_hu: float


@dataclass(frozen=True)
class _Ellipsoid:
    centre: tuple[float, float, float]  # head coordinates (u left, v posterior, w superior), mm
    axes: tuple[float, float, float]
    hu: float


@dataclass(frozen=True)
class _Head:
    """Anatomy in head coordinates, centred on the head; densities in HU."""

    centre_xy: tuple[float, float]
    axes: tuple[float, float, float]
    yaw: float
    pitch: float
    lobes: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase) of the outline
    frontal_taper: float
    scalp_mm: float
    skull_mm: float
    csf_mm: float
    cortex_mm: float
    sulcus_mm: float
    floor: tuple[float, float]  # anterior and posterior skull-base height, fraction of axes[2]
    scalp_hu: float
    table_hu: float
    diploe_hu: float
    csf_hu: float
    grey_hu: float
    white_hu: float
    falx_hu: float
    base_bone_hu: float
    bias_hu: float
    ventricles: tuple[_Ellipsoid, ...]
    nuclei: tuple[_Ellipsoid, ...]
    calcifications: tuple[_Ellipsoid, ...]


@dataclass(frozen=True)
class _Blob:
    """Intraparenchymal lesion: a rotated, lumpy ellipsoid with an optional hypodense rim."""

    centre: tuple[float, float, float]
    rotation: FloatArray
    axes: tuple[float, float, float]
    lumpiness: float
    hu: float
    heterogeneity_hu: float
    edema_mm: float
    edema_hu: float

    @property
    def reach_mm(self) -> float:
        return max(self.axes) * (1 + 2 * self.lumpiness) + self.edema_mm


@dataclass(frozen=True)
class _Collection:
    """Extra-axial lesion: thickness T0 (1 - (s/S)^2)^p at distance s from its centre (on the
    inner table, where it is thickest), on one side of the falx."""

    centre: tuple[float, float, float]
    spread_mm: float
    thickness_mm: float
    power: float
    side: float
    hu: float
    heterogeneity_hu: float

    @property
    def reach_mm(self) -> float:
        return self.spread_mm + self.thickness_mm


_Lesion = _Blob | _Collection


def generate_phantom(
    seed: int,
    *,
    lesion: bool | None = None,
    matrix: int | None = None,
    slices: int | None = None,
    noise_scale: float = 1.0,
    lesion_contrast_hu: float = 0.0,
) -> Phantom:
    """The phantom of `seed`: same seed, same volume, to the bit.

    `lesion` forces a lesion (True) or none (False); None lets the seed decide, half of the time.
    `matrix` reconstructs the same scan at another matrix over the same field of view, with the
    noise of the native pixels averaged into the coarser ones (to train fast at low resolution).
    `slices` reconstructs it as that many slices over the same head-to-foot range (thinner or
    thicker slices, the noise as sampled), e.g. a thin-slice series of 300 images.

    Two knobs shift the data away from what the model was trained on (drift tests) and draw no
    random numbers, so the same seed keeps the same anatomy, lesions and noise pattern:
    `noise_scale` multiplies the image noise (its sigma, after any `matrix` scaling), and
    `lesion_contrast_hu` is added to each lesion's density (50-90 HU; negative makes lesions
    fainter, towards grey matter at about 31-43 HU; `LesionSpec.mean_hu` reports the result).
    Their defaults leave the phantom bit-identical to one generated without them.
    """
    if not math.isfinite(noise_scale) or noise_scale < 0:
        raise ValueError(f"noise_scale must be a finite number >= 0, not {noise_scale}")
    if not math.isfinite(lesion_contrast_hu):
        raise ValueError(f"lesion_contrast_hu must be a finite number, not {lesion_contrast_hu}")
    rng = np.random.default_rng(seed)
    head = _sample_head(rng)
    acquisition = _sample_acquisition(rng, head)
    if matrix is not None:
        acquisition = _reconstruct_at(acquisition, matrix)
    if slices is not None:
        acquisition = _reslice(acquisition, slices)
    wants_lesion = bool(rng.random() < 0.5) if lesion is None else lesion
    lesions = _sample_lesions(rng, head, lesion_contrast_hu) if wants_lesion else []
    rendered = _Renderer(head, acquisition, lesions, rng).render()
    hu_float = rendered.hu
    sigma = acquisition.noise_sigma_hu * noise_scale  # exactly the same sigma at 1.0
    hu_float += rng.standard_normal(hu_float.shape, dtype=np.float32) * sigma
    hu = np.clip(np.rint(hu_float, out=hu_float), HU_MIN, HU_MAX, out=hu_float).astype(np.int16)
    fraction = rendered.lesion_fraction
    mask = np.zeros(hu.shape, np.uint8) if fraction is None else (fraction >= 0.5).astype(np.uint8)
    spacing = (
        acquisition.slice_thickness_mm,
        acquisition.pixel_spacing_mm,
        acquisition.pixel_spacing_mm,
    )
    specs = [
        LesionSpec(kind=_kind(item), centre_voxel=centre, volume_ml=volume, mean_hu=item.hu)
        for item, centre, volume in zip(lesions, rendered.centres, rendered.volumes_ml, strict=True)
    ]
    return Phantom(
        seed=seed,
        hu=hu,
        spacing_mm=spacing,
        mask=mask,
        lesions=specs,
        first_slice_z_mm=acquisition.first_slice_z_mm,
    )


def acquisition_for(seed: int) -> Acquisition:
    """How the phantom of `seed` is scanned at its native matrix, without rendering it."""
    rng = np.random.default_rng(seed)
    return _sample_acquisition(rng, _sample_head(rng))


def _kind(item: _Lesion) -> LesionKind:
    return "intraparenchymal" if isinstance(item, _Blob) else "extra-axial"


def _sample_head(rng: np.random.Generator) -> _Head:
    ax, ay, c = rng.uniform(68, 80), rng.uniform(86, 100), rng.uniform(78, 92)
    brain = rng.uniform(27, 36)
    atrophy = rng.uniform(0, 1)
    ventricle_w, ventricle_h = rng.uniform(6, 10), rng.uniform(8, 20)
    lateral = (4 + 8 * atrophy) * rng.uniform(0.8, 1.2)
    csf_hu = rng.uniform(0, 15)
    ventricles = (
        *(
            _Ellipsoid(
                (side * ventricle_w, rng.uniform(-12, 0), ventricle_h), (lateral, 32, 9), csf_hu
            )
            for side in (-1, 1)
        ),
        _Ellipsoid((0, 4, ventricle_h - 16), (1.5 + 2 * atrophy, 12, 9), csf_hu),
        _Ellipsoid((0, 0.42 * ay, -0.4 * c), (5, 4, 6), csf_hu),
    )
    nuclei = tuple(
        _Ellipsoid((side * 16, 2, ventricle_h - 16), (8, 15, 10), 0.0) for side in (-1, 1)
    )
    calcifications: list[_Ellipsoid] = []
    if rng.random() < 0.6:
        radius = rng.uniform(2, 4)
        calcifications.append(
            _Ellipsoid((0, 20, ventricle_h - 12), (radius,) * 3, rng.uniform(150, 400))
        )
    if rng.random() < 0.5:
        radius, hu = rng.uniform(2, 3.5), rng.uniform(150, 400)
        calcifications.extend(
            _Ellipsoid((side * (ventricle_w + lateral * 0.5), 26, ventricle_h), (radius,) * 3, hu)
            for side in (-1, 1)
        )
    return _Head(
        centre_xy=(rng.uniform(-10, 10), rng.uniform(-10, 10)),
        axes=(ax, ay, c),
        yaw=math.radians(rng.uniform(-10, 10)),
        pitch=math.radians(rng.uniform(-12, 12)),
        lobes=tuple((k, rng.uniform(0.0, 0.03), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5)),
        frontal_taper=rng.uniform(0.0, 0.1),
        scalp_mm=rng.uniform(3, 7),
        skull_mm=rng.uniform(5, 9),
        csf_mm=0.5 + 2.5 * atrophy,
        cortex_mm=rng.uniform(2.5, 4),
        sulcus_mm=0.8 + 2.2 * atrophy,
        floor=(rng.uniform(-0.30, -0.20), rng.uniform(-0.62, -0.48)),
        scalp_hu=rng.uniform(20, 50),
        table_hu=rng.uniform(1100, 1500),
        diploe_hu=rng.uniform(650, 900),
        csf_hu=csf_hu,
        grey_hu=brain + rng.uniform(4, 7),
        white_hu=brain - rng.uniform(3, 6),
        falx_hu=rng.uniform(45, 60),
        base_bone_hu=rng.uniform(800, 1600),
        bias_hu=rng.uniform(0, 3),
        ventricles=ventricles,
        nuclei=nuclei,
        calcifications=tuple(calcifications),
    )


def _sample_acquisition(rng: np.random.Generator, head: _Head) -> Acquisition:
    matrix = int(rng.choice([256, 384, 512], p=[0.3, 0.2, 0.5]))
    ax, ay, c = head.axes
    reach = 2 * (max(ax, ay) + 8 + max(abs(v) for v in head.centre_xy))
    fov = max(rng.uniform(215, 256), reach)
    thickness = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
    bottom = -c * rng.uniform(0.6, 0.8)
    top = c + rng.uniform(5, 15)
    return Acquisition(
        matrix=matrix,
        pixel_spacing_mm=fov / matrix,
        slice_thickness_mm=thickness,
        slice_count=math.ceil((top - bottom) / thickness),
        first_slice_z_mm=bottom + thickness / 2,
        noise_sigma_hu=rng.uniform(3, 12),
    )


def _reconstruct_at(acquisition: Acquisition, matrix: int) -> Acquisition:
    fov = acquisition.matrix * acquisition.pixel_spacing_mm
    spacing = fov / matrix
    sigma = acquisition.noise_sigma_hu * min(1.0, acquisition.pixel_spacing_mm / spacing)
    return Acquisition(
        matrix=matrix,
        pixel_spacing_mm=spacing,
        slice_thickness_mm=acquisition.slice_thickness_mm,
        slice_count=acquisition.slice_count,
        first_slice_z_mm=acquisition.first_slice_z_mm,
        noise_sigma_hu=sigma,
    )


def _reslice(acquisition: Acquisition, slices: int) -> Acquisition:
    if slices < 1:
        raise ValueError(f"slices must be at least 1, not {slices}")
    span = acquisition.slice_count * acquisition.slice_thickness_mm
    bottom = acquisition.first_slice_z_mm - acquisition.slice_thickness_mm / 2
    thickness = span / slices
    return replace(
        acquisition,
        slice_thickness_mm=thickness,
        slice_count=slices,
        first_slice_z_mm=bottom + thickness / 2,
    )


def _sample_lesions(
    rng: np.random.Generator, head: _Head, contrast_hu: float = 0.0
) -> list[_Lesion]:
    count = 2 if rng.random() < 0.15 else 1
    lesions: list[_Lesion] = []
    for _ in range(count):
        volume_mm3 = 1000 * math.exp(rng.uniform(math.log(1), math.log(60)))
        hu = rng.uniform(max(50.0, head.grey_hu + 20), 90) + contrast_hu  # x + 0.0 == x
        if rng.random() < 0.5:
            lesions.append(_sample_blob(rng, head, volume_mm3, hu))
        else:
            lesions.append(_sample_collection(rng, head, volume_mm3, hu))
    return lesions


def _sample_blob(rng: np.random.Generator, head: _Head, volume_mm3: float, hu: float) -> _Blob:
    ratios = rng.uniform(0.65, 1.35, size=3)
    ratios /= ratios.prod() ** (1 / 3)
    radius = (3 * volume_mm3 / (4 * math.pi)) ** (1 / 3)
    ax, ay, c = head.axes
    centre = (0.0, 0.0, 0.0)
    for _ in range(200):
        u, v, w = (
            rng.uniform(-0.7, 0.7) * ax,
            rng.uniform(-0.7, 0.7) * ay,
            rng.uniform(-0.3, 0.7) * c,
        )
        margin = 0.8 * radius * ratios.max() + 5
        inner = (
            _depth_mm(head, np.array(u), np.array(v), np.array(w)) - head.scalp_mm - head.skull_mm
        )
        if float(inner) > margin and w - float(_floor_mm(head, np.array(u), np.array(v))) > margin:
            centre = (u, v, w)
            break
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return _Blob(
        centre=centre,
        rotation=rotation.astype(np.float32),
        axes=tuple(float(radius * r) for r in ratios),  # type: ignore[arg-type]
        lumpiness=rng.uniform(0.08, 0.25),
        hu=hu,
        heterogeneity_hu=rng.uniform(2, 6),
        edema_mm=rng.uniform(0, 6),
        edema_hu=head.white_hu - rng.uniform(4, 10),
    )


def _sample_collection(
    rng: np.random.Generator, head: _Head, volume_mm3: float, hu: float
) -> _Collection:
    epidural = rng.random() < 0.35
    power = 0.5 if epidural else 1.0
    spread = rng.uniform(18, 40) if epidural else rng.uniform(35, 70)
    thickness = volume_mm3 * (power + 1) / (math.pi * spread**2)
    thickness = min(max(thickness, 5.0), 25.0 if epidural else 15.0)
    spread = math.sqrt(volume_mm3 * (power + 1) / (math.pi * thickness))
    side = float(rng.choice([-1.0, 1.0]))
    azimuth = rng.uniform(-1.1, 1.1) + (0 if side > 0 else math.pi)
    elevation = rng.uniform(-0.05, 0.75)
    ax, ay, c = head.axes
    direction = np.array(
        [
            math.cos(elevation) * math.cos(azimuth),
            math.cos(elevation) * math.sin(azimuth),
            math.sin(elevation),
        ]
    )
    skin = direction * np.array([ax, ay, c])
    anchor = skin * (1 - (head.scalp_mm + head.skull_mm) / float(np.linalg.norm(skin)))
    return _Collection(
        centre=(float(anchor[0]), float(anchor[1]), float(anchor[2])),
        spread_mm=spread,
        thickness_mm=thickness,
        power=power,
        side=side,
        hu=hu,
        heterogeneity_hu=rng.uniform(2, 5),
    )


def _outline(head: _Head, u: RealArray, v0: RealArray) -> tuple[RealArray, RealArray]:
    """Semi-axes (left-right, antero-posterior) of the irregular head outline at each azimuth.

    The azimuth is taken in the scanner's axial plane (`v0` is the antero-posterior coordinate
    before the pitch), so the renderer computes it once for all slices.
    """
    angle = np.arctan2(v0, u)
    scale = np.ones_like(angle)
    for order, amplitude, phase in head.lobes:
        scale += amplitude * np.cos(order * angle + phase)
    taper = 1 - head.frontal_taper * np.clip(-v0 / head.axes[1], 0, 1)
    return np.asarray(head.axes[0] * scale * taper), np.asarray(head.axes[1] * scale)


def _depth_mm(
    head: _Head,
    u: RealArray,
    v: RealArray,
    w: RealArray,
    outline: tuple[RealArray, RealArray] | None = None,
) -> RealArray:
    """First-order distance below the skin (negative outside): (1 - rho) / |grad rho|."""
    if outline is None:
        v0 = math.cos(head.pitch) * v + math.sin(head.pitch) * w
        outline = _outline(head, u, v0)
    a, b = outline
    c = head.axes[2]
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
    gradient = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (w / c**2) ** 2)
    radius = np.divide(rho, gradient, out=np.full_like(rho, c), where=gradient > 0)
    return np.asarray((1 - rho) * radius, np.float32)


def _floor_mm(head: _Head, u: RealArray, v: RealArray) -> RealArray:
    """Height of the skull base: anterior fossa high, posterior fossa low, middle fossa dipping."""
    anterior, posterior = head.floor
    step = np.clip((v / head.axes[1] + 0.1) / 0.5, 0, 1)
    step = step * step * (3 - 2 * step)
    lateral = 0.1 * (u / head.axes[0]) ** 2
    return np.asarray(head.axes[2] * (anterior + (posterior - anterior) * step - lateral))


@dataclass(frozen=True)
class _Rendered:
    """Noise-free HU on the output matrix, total lesion fraction, and truth per lesion."""

    hu: FloatArray
    lesion_fraction: FloatArray | None
    centres: list[tuple[int, int, int]]
    volumes_ml: list[float]


@dataclass
class _Renderer:
    """Renders sub-slices in chunks at the render grid, inside the head's window, then upsamples."""

    head: _Head
    acquisition: Acquisition
    lesions: list[_Lesion]
    rng: np.random.Generator
    render_matrix: int = field(init=False)
    edge_mm: float = field(init=False)

    def __post_init__(self) -> None:
        fov = self.acquisition.matrix * self.acquisition.pixel_spacing_mm
        self.render_matrix = min(self.acquisition.matrix, math.ceil(fov / RENDER_SPACING_MM))
        self.edge_mm = fov / self.render_matrix

    def render(self) -> _Rendered:
        acq, head, n = self.acquisition, self.head, self.render_matrix
        grid = axis_positions(n, self.edge_mm, -(n - 1) * self.edge_mm / 2)
        rows, cols = self._head_window(grid)
        self._rows_mm = grid[rows] - head.centre_xy[1]
        self._cols_mm = grid[cols] - head.centre_xy[0]
        y, x = np.meshgrid(self._rows_mm, self._cols_mm, indexing="ij")
        cos_yaw, sin_yaw = math.cos(head.yaw), math.sin(head.yaw)
        self._u = np.asarray(cos_yaw * x + sin_yaw * y, np.float32)
        self._v0 = np.asarray(-sin_yaw * x + cos_yaw * y, np.float32)
        self._outline = _outline(head, self._u, self._v0)
        subs = max(1, math.ceil(acq.slice_thickness_mm / SUB_SLICE_MM))
        offsets = (((np.arange(subs) + 0.5) / subs - 0.5) * acq.slice_thickness_mm).astype(
            np.float32
        )
        z_slices = axis_positions(acq.slice_count, acq.slice_thickness_mm, acq.first_slice_z_mm)
        self._fields = _CoarseFields(self.rng, grid[rows], grid[cols], z_slices, count=5)
        hu = np.full((acq.slice_count, n, n), AIR_HU, np.float32)
        fractions = np.zeros((len(self.lesions), acq.slice_count, n, n), np.float32)
        chunk = max(1, PLANES_PER_CHUNK // (subs * self._u.size))
        for start in range(0, acq.slice_count, chunk):
            block = slice(start, min(start + chunk, acq.slice_count))
            z = (z_slices[block, None] + offsets[None, :]).ravel()
            planes, lesion_planes = self._planes(z)
            shape = (-1, subs, *self._u.shape)
            hu[block, rows, cols] = planes.reshape(shape).mean(axis=1)
            for index, lesion_plane in enumerate(lesion_planes):
                fractions[index, block, rows, cols] = lesion_plane.reshape(shape).mean(axis=1)
        voxel_ml = acq.slice_thickness_mm * self.edge_mm**2 / 1000
        total = np.clip(fractions.sum(axis=0), 0, 1) if self.lesions else None
        return _Rendered(
            hu=self._to_matrix(hu),
            lesion_fraction=None if total is None else self._to_matrix(total),
            centres=[self._centre_voxel(f) for f in fractions],
            volumes_ml=[float(f.sum()) * voxel_ml for f in fractions],
        )

    def _head_window(self, grid: FloatArray) -> tuple[slice, slice]:
        """Rows and columns that can hold any part of the head; the rest stays air."""
        head = self.head
        ax, ay, _ = head.axes
        reach = 1 + sum(amplitude for _, amplitude, _ in head.lobes)
        cos_yaw, sin_yaw = abs(math.cos(head.yaw)), abs(math.sin(head.yaw))
        half_x = (ax * cos_yaw + ay * sin_yaw) * reach + 2 * self.edge_mm
        half_y = (ay * cos_yaw + ax * sin_yaw) * reach + 2 * self.edge_mm
        x0, y0 = head.centre_xy
        cols = np.flatnonzero(np.abs(grid - x0) <= half_x)
        rows = np.flatnonzero(np.abs(grid - y0) <= half_y)
        return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)

    def _to_matrix(self, volume: FloatArray) -> FloatArray:
        acq, n = self.acquisition, self.render_matrix
        if n == acq.matrix:
            return volume
        source = axis_positions(n, self.edge_mm, -(n - 1) * self.edge_mm / 2)
        spacing = acq.pixel_spacing_mm
        target = axis_positions(acq.matrix, spacing, -(acq.matrix - 1) * spacing / 2)
        weights = resampling_weights(source, target, self.edge_mm, spacing)
        return apply_separable(volume, (None, weights, weights))

    def _centre_voxel(self, fraction: FloatArray) -> tuple[int, int, int]:
        """Fraction-weighted centroid, as a voxel index of the output matrix."""
        acq = self.acquisition
        total = float(fraction.sum())
        k, i, j = (
            float((fraction.sum(axis=axes) * np.arange(fraction.shape[axis])).sum()) / total
            for axis, axes in ((0, (1, 2)), (1, (0, 2)), (2, (0, 1)))
        )
        scale = self.edge_mm / acq.pixel_spacing_mm
        offset = (acq.matrix - 1) / 2 - (self.render_matrix - 1) / 2 * scale
        return round(k), round(offset + i * scale), round(offset + j * scale)

    def _ramp(self, distance: RealArray) -> FloatArray:
        """Partial-volume fraction of a boundary `distance` mm inside (positive) or outside."""
        return np.asarray(np.clip(0.5 + distance / self.edge_mm, 0, 1), np.float32)

    def _planes(self, z: FloatArray) -> tuple[FloatArray, FloatArray]:
        """HU and per-lesion fraction of the sub-slices at heights `z`, shape (k, rows, cols)."""
        head = self.head
        cos_p, sin_p = math.cos(head.pitch), math.sin(head.pitch)
        v = cos_p * self._v0 - sin_p * z[:, None, None]
        w = sin_p * self._v0 + cos_p * z[:, None, None]
        u = np.broadcast_to(self._u, w.shape)
        noise = self._fields.at(z)
        depth = _depth_mm(head, u, v, w, self._outline)
        inner = depth - head.scalp_mm - head.skull_mm
        height = w - _floor_mm(head, u, v)
        above_floor = self._ramp(height)
        content = self._brain(z, u, v, w, inner, noise)
        lesion_planes = np.zeros((len(self.lesions), *w.shape), np.float32)
        for index, lesion in enumerate(self.lesions):
            box = self._box(lesion.centre, lesion.reach_mm, z)
            if box is None:
                continue
            layers = self._lesion_layers(lesion, u[box], v[box], w[box], inner[box], noise[:, *box])
            for fraction, hu in layers:
                content[box] += (hu - content[box]) * fraction * above_floor[box]
            lesion_planes[index][box] = layers[-1][0] * above_floor[box] * self._ramp(inner[box])
        base = self._skull_base(height, noise[2])
        interior = base + (content - base) * above_floor
        position = np.clip((depth - head.scalp_mm) / head.skull_mm, 0, 1)
        bone = head.diploe_hu + (head.table_hu - head.diploe_hu) * (2 * position - 1) ** 2
        plane = (
            AIR_HU
            + (head.scalp_hu - AIR_HU) * self._ramp(depth)
            + (bone - head.scalp_hu) * self._ramp(depth - head.scalp_mm)
            + (interior - bone) * self._ramp(inner)
        )
        return plane, lesion_planes

    def _box(
        self, centre: tuple[float, float, float], radius_mm: float, z: FloatArray
    ) -> tuple[slice, slice, slice] | None:
        """Index box of the chunk around a point given in head coordinates (None if outside)."""
        head = self.head
        u, v, w = centre
        v0 = math.cos(head.pitch) * v + math.sin(head.pitch) * w
        z_centre = -math.sin(head.pitch) * v + math.cos(head.pitch) * w
        x = math.cos(head.yaw) * u - math.sin(head.yaw) * v0
        y = math.sin(head.yaw) * u + math.cos(head.yaw) * v0
        reach = radius_mm + 2 * self.edge_mm
        found = [
            np.flatnonzero(np.abs(positions - middle) <= reach)
            for positions, middle in ((z, z_centre), (self._rows_mm, y), (self._cols_mm, x))
        ]
        if any(indices.size == 0 for indices in found):
            return None
        planes, rows, cols = (slice(int(i[0]), int(i[-1]) + 1) for i in found)
        return planes, rows, cols

    def _brain(
        self,
        z: FloatArray,
        u: FloatArray,
        v: FloatArray,
        w: FloatArray,
        inner: FloatArray,
        noise: FloatArray,
    ) -> FloatArray:
        """Intracranial content: cortex, white matter, sulci, nuclei, ventricles, falx, bias."""
        head = self.head
        below_surface = inner - head.csf_mm
        white = self._ramp(below_surface - head.cortex_mm - 3 * noise[0])
        tissue = head.grey_hu + (head.white_hu - head.grey_hu) * white
        self._paint(tissue, head.nuclei, z, u, v, w, hu=head.grey_hu)
        sulcus = self._ramp(head.sulcus_mm / 2 - np.abs(noise[1]) * 6)
        brain = self._ramp(below_surface) * (1 - sulcus * self._ramp(15 - below_surface))
        content = head.csf_hu + (tissue - head.csf_hu) * brain
        fissure_level = self._ramp(w - head.ventricles[0].centre[2] - 8)
        content += (head.csf_hu - content) * self._ramp(1.5 - np.abs(u)) * fissure_level
        content += (head.falx_hu - content) * self._ramp(0.5 - np.abs(u)) * fissure_level
        self._paint(content, head.ventricles + head.calcifications, z, u, v, w)
        return np.asarray(content + head.bias_hu * noise[3], np.float32)

    def _paint(
        self,
        target: FloatArray,
        shapes: tuple[_Ellipsoid, ...],
        z: FloatArray,
        u: FloatArray,
        v: FloatArray,
        w: FloatArray,
        hu: float | None = None,
    ) -> None:
        """Paint ellipsoids into `target` in place, each with its own density unless `hu` is set."""
        for shape in shapes:
            box = self._box(shape.centre, max(shape.axes), z)
            if box is None:
                continue
            (cu, cv, cw), axes = shape.centre, shape.axes
            rho = np.sqrt(
                ((u[box] - cu) / axes[0]) ** 2
                + ((v[box] - cv) / axes[1]) ** 2
                + ((w[box] - cw) / axes[2]) ** 2
            )
            density = shape.hu if hu is None else hu
            target[box] += (density - target[box]) * self._ramp((1 - rho) * min(axes))

    def _lesion_layers(
        self,
        lesion: _Lesion,
        u: FloatArray,
        v: FloatArray,
        w: FloatArray,
        inner: FloatArray,
        noise: FloatArray,
    ) -> list[tuple[FloatArray, FloatArray]]:
        """(fraction, density) layers painted in order; the last one is the lesion itself."""
        hu = np.asarray(lesion.hu + lesion.heterogeneity_hu * noise[1], np.float32)
        offsets = np.stack([u - lesion.centre[0], v - lesion.centre[1], w - lesion.centre[2]])
        if isinstance(lesion, _Blob):
            local = np.tensordot(lesion.rotation.T, offsets, axes=1)
            rho = np.sqrt(sum((local[i] / lesion.axes[i]) ** 2 for i in range(3)))
            distance = (1 - rho * (1 + lesion.lumpiness * noise[4])) * min(lesion.axes)
            inside = self._ramp(inner - 2)
            edema = self._ramp(distance + lesion.edema_mm) * inside
            return [(edema, np.full_like(hu, lesion.edema_hu)), (self._ramp(distance) * inside, hu)]
        profile = np.clip(1 - (offsets**2).sum(axis=0) / lesion.spread_mm**2, 0, 1) ** lesion.power
        fraction = self._ramp(lesion.thickness_mm * profile - inner) * (profile > 0)
        return [(fraction * self._ramp(lesion.side * u - 1.5), hu)]

    def _skull_base(self, height: FloatArray, noise: FloatArray) -> FloatArray:
        """Below the floor: a bony plate over a mix of bone, soft tissue and air cells."""
        head = self.head
        soft = 40.0
        bone = np.clip((noise - 0.2) / 0.3, 0, 1)
        air = np.clip((-noise - 0.9) / 0.3, 0, 1)
        base = soft + (head.base_bone_hu - soft) * bone + (AIR_HU - soft) * air
        plate = self._ramp(height + 4)
        return np.asarray(base + (head.table_hu - base) * plate, np.float32)


class _CoarseFields:
    """Smooth unit-variance random fields on a coarse lattice, read at any sub-slice height."""

    def __init__(
        self,
        rng: np.random.Generator,
        rows_mm: FloatArray,
        cols_mm: FloatArray,
        z_slices: FloatArray,
        count: int,
    ) -> None:
        margin = 2 * FIELD_SPACING_MM
        lattices = [
            np.arange(float(axis[0]) - margin, float(axis[-1]) + margin, FIELD_SPACING_MM)
            for axis in (z_slices, rows_mm, cols_mm)
        ]
        self._z0 = float(lattices[0][0])
        shape = (count, *(len(axis) for axis in lattices))
        noise = ndimage.gaussian_filter(
            rng.standard_normal(shape, dtype=np.float32), sigma=(0, 1.5, 1.5, 1.5)
        )
        noise /= noise.std(axis=(1, 2, 3), keepdims=True)
        spacing = float(rows_mm[1] - rows_mm[0])
        row_weights, col_weights = (
            resampling_weights(lattice.astype(np.float32), target, FIELD_SPACING_MM, spacing)
            for lattice, target in ((lattices[1], rows_mm), (lattices[2], cols_mm))
        )
        self._planes = np.einsum("ia,fzab,jb->fzij", row_weights, noise, col_weights, optimize=True)

    def at(self, z: FloatArray) -> FloatArray:
        """Fields at heights `z`, shape (count, len(z), rows, cols), linear between planes."""
        position = (z - self._z0) / FIELD_SPACING_MM
        index = np.clip(position.astype(np.int64), 0, self._planes.shape[1] - 2)
        t = (position - index).astype(np.float32)[None, :, None, None]
        return np.asarray(
            self._planes[:, index] * (1 - t) + self._planes[:, index + 1] * t, np.float32
        )


def phantom_uids(seed: int, prefix: str | None = None) -> tuple[str, str]:
    """Deterministic (study, series) instance UIDs for the phantom of `seed`."""
    root = prefix or PYDICOM_ROOT_UID
    return (
        generate_uid(root, entropy_srcs=["phantom-study", str(seed)]),
        generate_uid(root, entropy_srcs=["phantom-series", str(seed)]),
    )


def write_dicom_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    study_uid: str,
    series_uid: str,
    patient_name: str = "PHANTOM^HEAD",
    patient_id: str | None = None,
    accession: str | None = None,
    body_part: str = "HEAD",
    series_description: str = "HEAD NON-CONTRAST",
    instance_uid_prefix: str | None = None,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series, one file per slice, feet to head.

    Explicit VR little endian, unsigned 12-bit pixels with rescale intercept -1024, axial
    orientation. Instance and frame-of-reference UIDs derive from the seed and `series_uid`, so
    the same call writes the same files; patient ID and accession default to ones from the seed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    root = instance_uid_prefix or PYDICOM_ROOT_UID
    entropy = [f"seed={phantom.seed}", f"series={series_uid}"]
    common = _series_dataset(
        phantom,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=generate_uid(root, entropy_srcs=[*entropy, "frame-of-reference"]),
        patient_name=patient_name,
        patient_id=patient_id or f"PHANTOM{phantom.seed:06d}",
        accession=accession or f"PH{phantom.seed:08d}",
        body_part=body_part,
        series_description=series_description,
    )
    stored = (phantom.hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16)
    slice_mm, row_mm, col_mm = phantom.spacing_mm
    slices, rows, cols = phantom.hu.shape
    paths = []
    for index in range(slices):
        ds = copy.deepcopy(common)
        sop_uid = generate_uid(root, entropy_srcs=[*entropy, f"instance={index}"])
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = index + 1
        z = phantom.first_slice_z_mm + index * slice_mm
        ds.ImagePositionPatient = [
            _ds(-(cols - 1) / 2 * col_mm),
            _ds(-(rows - 1) / 2 * row_mm),
            _ds(z),
        ]
        ds.SliceLocation = _ds(z)
        ds.PixelData = stored[index].tobytes()
        path = out_dir / f"CT{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _series_dataset(
    phantom: Phantom,
    *,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    patient_name: str,
    patient_id: str,
    accession: str,
    body_part: str,
    series_description: str,
) -> Dataset:
    """What all slices share: the CT Image IOD's modules without the per-slice values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession
    ds.StudyDescription = "CT HEAD"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    # Frame of Reference and General Equipment
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "triage"
    ds.ManufacturerModelName = "synthetic head phantom"
    # Image Plane
    slice_mm, row_mm, col_mm = phantom.spacing_mm
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [_ds(row_mm), _ds(col_mm)]
    ds.SliceThickness = _ds(slice_mm)
    # Image Pixel and CT Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = phantom.hu.shape[1:]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    # VOI LUT: the brain window
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    return ds


def _ds(value: float) -> DSfloat:
    """A decimal string that fits the 16 characters DS allows."""
    return DSfloat(value, auto_format=True)
