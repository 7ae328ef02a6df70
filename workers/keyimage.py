"""A key image for a finding: the slice that shows a segment best, as a captioned PNG preview.

The worklist shows it beside an AI finding so that a radiologist sees at a glance what the model
marked; it is the picture counterpart of the key images that IHE AI Results (AIR) has an
algorithm's results reference (a Key Object Selection names the same source instance:
``sop_instance_uid`` and ``sop_class_uid`` of ``slice_index``). It is a non-diagnostic preview:
8 bits, one fixed window, and the caption "AI preview - not for diagnosis" burnt in on a dark
band below the image. Reading happens in the viewer, on the source images.

Pure: numpy and Pillow on arrays already in memory, no I/O, no database. About 15 ms for a
32x512x512 head CT on a 2-core machine, most of it the PNG encoding (bench/inference, "key
image").

What it draws:

- The slice: the one in which the segment's cross-section is largest (the lower index on a tie).
- Grey values: CT in Hounsfield units through a linear window, the brain window (W80/L40) when the
  body part is HEAD or BRAIN, the soft-tissue window (W400/L40) for any other or no body part;
  level - width/2 is black, level + width/2 white, linear in between (40 HU in W80/L40 is
  127.5, rounded to 128). Other modalities: the slice's own 1st to 99th percentile. MONOCHROME1
  slices are inverted, as they are meant to be shown.
- Orientation: as the source images store their pixels (``Volume.to_source_frames``), which is
  how the viewer shows that instance, not the canonical grid's.
- The outline: the segment's pixels on that slice within 1 pixel (2 on a 512-pixel image, one
  more per 256 pixels of the shorter side) of a pixel outside it or of the image's edge, by
  4-neighbour steps, in yellow; the lesion's inside stays visible, nothing outside it is
  covered.
- Size: images narrower or shorter than 256 pixels are enlarged by a whole factor (nearest
  neighbour, so pixels and outline stay crisp) until the caption fits; the band adds
  ``height - rows * factor`` rows below the image.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from workers.volume import Volume

CAPTION = "AI preview - not for diagnosis"
BRAIN_WINDOW = (80.0, 40.0)  # width, level (HU)
SOFT_TISSUE_WINDOW = (400.0, 40.0)
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN"})
PERCENTILES = (1.0, 99.0)  # the grey range of a slice that is not CT
OUTLINE_RGB = (255, 255, 0)
OUTLINE_EVERY = 256  # the outline is a pixel thick per this many pixels of the shorter side
BAND_RGB = (0, 0, 0)
TEXT_RGB = (255, 255, 255)
MIN_SIDE = 256  # smaller images are enlarged to at least this many pixels a side
MAX_SIDE = 2048  # ...but never beyond this
PNG_COMPRESS_LEVEL = 1  # zlib level: 512x512 in a few ms; the file is a preview, sent once

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass(frozen=True)
class KeyImage:
    """A rendered key image and the source instance it shows."""

    png: bytes
    slice_index: int  # canonical slice: into Volume.voxels and Volume.datasets
    sop_instance_uid: str  # of Volume.datasets[slice_index]
    sop_class_uid: str
    width: int  # of the PNG, in pixels
    height: int


def key_slice(mask: npt.NDArray[np.integer[Any]], segment: int) -> int:
    """The canonical slice in which ``segment`` covers the most pixels; the lower index on a
    tie. Raises ValueError if no voxel of ``mask`` is ``segment``."""
    if mask.ndim != 3:
        raise ValueError(f"the mask has {mask.ndim} dimensions, not 3 (slice, row, column)")
    # Slice by slice: count_nonzero of a 2-D comparison is several times faster than one
    # reduction over a 3-D boolean array with an axis.
    areas = [np.count_nonzero(plane == segment) for plane in mask]
    index = int(np.argmax(areas)) if areas else 0
    if not areas or areas[index] == 0:
        raise ValueError(f"segment {segment} is empty")
    return index


def render_key_image(
    volume: Volume,
    mask: npt.NDArray[np.integer[Any]],
    segment: int,
    *,
    modality: str | None,
    body_part: str | None,
) -> KeyImage:
    """The key image of ``segment`` in ``mask``, a label map on the volume's canonical grid
    (``ModelOutput.mask``: same shape as ``volume.voxels``, 0 the background).

    ``modality`` and ``body_part`` are the series' (Modality, Body Part Examined); they choose
    the window. Raises ValueError if the mask's shape differs from the volume's, if
    ``segment`` is not a segment number (1 or more) or if no voxel of it is in the mask.
    """
    if mask.shape != volume.voxels.shape:
        raise ValueError(f"mask shape {mask.shape} is not the volume's {volume.voxels.shape}")
    if segment < 1:
        raise ValueError(f"segment {segment} is not a segment number (0 is the background)")
    index = key_slice(mask, segment)
    header = volume.datasets[index]
    # As the source stores the slice: the flips to_source_frames applies to a whole mask.
    region = volume.to_source_frames((mask[index] == segment)[None])[0]
    values = volume.to_source_frames(volume.voxels[index][None])[0]
    grey = _grey(values, modality, body_part)
    if str(header.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        np.subtract(255, grey, out=grey)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[_outline(region, max(1, round(min(region.shape) / OUTLINE_EVERY)))] = OUTLINE_RGB
    png, width, height = _captioned_png(rgb)
    return KeyImage(
        png=png,
        slice_index=index,
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        width=width,
        height=height,
    )


def window_for(modality: str | None, body_part: str | None) -> tuple[float, float] | None:
    """(width, level) in HU for CT; None for other modalities (their slice's percentiles)."""
    if (modality or "").strip().upper() != "CT":
        return None
    if (body_part or "").strip().upper() in HEAD_BODY_PARTS:
        return BRAIN_WINDOW
    return SOFT_TISSUE_WINDOW


def _grey(
    values: npt.NDArray[np.float32], modality: str | None, body_part: str | None
) -> npt.NDArray[np.uint8]:
    """0..255: ``low`` black, ``high`` white, linear between, clipped."""
    window = window_for(modality, body_part)
    if window is None:
        low, high = (float(v) for v in np.percentile(values, PERCENTILES))
    else:
        width, level = window
        low, high = level - width / 2, level + width / 2
    scale = 255.0 / (high - low) if high > low else 0.0  # a flat slice: all black
    scaled = np.subtract(values, np.float32(low), dtype=np.float32)
    np.multiply(scaled, np.float32(scale), out=scaled)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def _outline(region: npt.NDArray[np.bool_], thickness: int) -> npt.NDArray[np.bool_]:
    """The pixels of ``region`` less than ``thickness`` steps (4-neighbour) from a pixel outside
    it or from the image's edge: ``region`` less its erosion by a cross, ``thickness`` times,
    with numpy shifts."""
    inner = region
    for _ in range(thickness):
        eroded = inner.copy()
        eroded[1:, :] &= inner[:-1, :]
        eroded[:-1, :] &= inner[1:, :]
        eroded[:, 1:] &= inner[:, :-1]
        eroded[:, :-1] &= inner[:, 1:]
        eroded[0, :] = eroded[-1, :] = False
        eroded[:, 0] = eroded[:, -1] = False
        inner = eroded
    return region & ~inner


def _factor(rows: int, columns: int) -> int:
    """The whole enlargement that brings the shorter side to MIN_SIDE, within MAX_SIDE."""
    shorter, longer = min(rows, columns), max(rows, columns)
    if shorter >= MIN_SIDE:
        return 1
    return max(1, min(math.ceil(MIN_SIDE / shorter), MAX_SIDE // longer))


@functools.lru_cache(maxsize=32)
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # Pillow 10.0: the fixed bitmap font
        return ImageFont.load_default()


def _caption_font(width: int) -> tuple[Font, tuple[int, int, int, int]]:
    """The largest font up to width/28 pixels (18 on a 512-pixel image, 12 at the least) whose
    caption fits in ``width`` with a margin; and the caption's box in it."""
    margin = 2 * max(4, width // 64)
    size = max(12, round(width / 28))
    while True:
        font = _font(size)
        box = tuple(int(v) for v in font.getbbox(CAPTION))
        if box[2] - box[0] <= width - margin or size <= 8:
            return font, (box[0], box[1], box[2], box[3])
        size -= 1


def _captioned_png(rgb: npt.NDArray[np.uint8]) -> tuple[bytes, int, int]:
    """The image, enlarged if small, with the caption on a dark band below it, as a PNG."""
    rows, columns = rgb.shape[:2]
    factor = _factor(rows, columns)
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    height, width = rgb.shape[:2]
    font, (left, top, right, bottom) = _caption_font(width)
    padding = max(4, (bottom - top) // 3)
    band = bottom - top + 2 * padding
    canvas = Image.new("RGB", (width, height + band), BAND_RGB)
    canvas.paste(Image.fromarray(rgb), (0, 0))
    x = (width - (right - left)) // 2 - left
    y = height + padding - top
    ImageDraw.Draw(canvas).text((x, y), CAPTION, fill=TEXT_RGB, font=font)
    out = io.BytesIO()
    canvas.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue(), width, height + band
