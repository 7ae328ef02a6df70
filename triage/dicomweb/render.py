"""Rendered frames for WADO-RS (PS3.18 8.3.5.1, 10.4.1.1.3): a frame as an 8-bit PNG or JPEG
for thumbnails and previews, never for reading.

Grey-scale frames go through the Modality LUT (rescale slope and intercept), then the linear
VOI window of PS3.3 C.11.2.1.2.1: the ``window`` parameter (``center,width[,function]``)
when given, else the instance's first Window Center and Width, else the frame's full range.
MONOCHROME1 is inverted so that higher values are darker, as it is meant to be shown. Colour
frames are sent as they are.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.pixels.processing import apply_modality_lut

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}


class RenderError(ValueError):
    """The frame cannot be rendered as asked (a bad window, no pixel data)."""


def parse_window(value: str | None) -> tuple[float, float] | None:
    """``center,width[,function]`` (only ``linear`` is offered). Raises RenderError."""
    if value is None:
        return None
    parts = value.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise RenderError("window is center,width[,linear]: two numbers") from None
    if len(parts) > 2 and parts[2].strip().lower() not in ("linear", ""):
        raise RenderError("only the linear window function is offered")
    if width < 1:
        raise RenderError("the window width must be at least 1")
    return center, width


def render(path: Path, frame: int, media_type: str, window: tuple[float, float] | None) -> bytes:
    """Frame ``frame`` (from 1) of the instance in ``path`` as ``media_type``. Raises
    RenderError."""
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise RenderError("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    if not 1 <= frame <= count:
        raise RenderError(f"the instance has {count} frame(s)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # a syntax pydicom cannot decode here
        raise RenderError(f"the pixel data cannot be decoded: {type(exc).__name__}") from None
    if count > 1:
        pixels = pixels[frame - 1]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:  # colour: as it is, scaled to 8 bits
        image = Image.fromarray(_to_uint8(pixels.astype(np.float64), None), mode="RGB")
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        shown = _to_uint8(values, window or _instance_window(ds))
        if photometric == "MONOCHROME1":
            shown = 255 - shown
        image = Image.fromarray(shown, mode="L")
    out = io.BytesIO()
    image.save(out, format=MEDIA_TYPES[media_type])
    return out.getvalue()


def _instance_window(ds: object) -> tuple[float, float] | None:
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is None or width is None:
        return None
    first = [float(v[0] if hasattr(v, "__len__") and not isinstance(v, str) else v)
             for v in (center, width)]  # fmt: skip
    return (first[0], first[1]) if first[1] >= 1 else None


def _to_uint8(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is None:
        low, high = float(values.min()), float(values.max())
        center, width = (low + high + 1) / 2, max(high - low + 1, 1.0)
    else:
        center, width = window
    # PS3.3 C.11.2.1.2.1, to an output range of 0..255.
    scaled = ((values - (center - 0.5)) / max(width - 1, 1e-6) + 0.5) * 255
    return np.clip(scaled, 0, 255).astype(np.uint8)
