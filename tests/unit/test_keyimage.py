"""workers.keyimage.render_key_image on small synthetic volumes built here.

Expected values come from the volume each test builds and from the definitions (a window
W/L maps L - W/2 to black and L + W/2 to white; the key slice is the one built with the
largest lesion; flipping rows puts row r at rows - 1 - r), never from the module's constants.
The picture is read back by decoding the PNG with Pillow.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from workers.keyimage import KeyImage, render_key_image
from workers.volume import Volume

SLICES, ROWS, COLUMNS = 6, 256, 320  # not square: a transposed picture would show
YELLOW = (255, 255, 0)
UID_ROOT = "1.2.826.0.1.3680043.10.511.99."


def _volume(
    voxels: npt.NDArray[np.float32],
    *,
    flips: tuple[bool, bool] = (False, False),
    sop_class: str = CTImageStorage,
    photometric: str = "MONOCHROME2",
) -> Volume:
    datasets = []
    for index in range(voxels.shape[0]):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = f"{UID_ROOT}{index + 1}"
        ds.PhotometricInterpretation = photometric
        datasets.append(ds)
    return Volume(f"{UID_ROOT}0", voxels, (5.0, 0.5, 0.5), datasets, flips)


def _blank(hu: float = 0.0, shape: tuple[int, int, int] = (SLICES, ROWS, COLUMNS)) -> Any:
    return np.full(shape, hu, dtype=np.float32)


def _picture(key: KeyImage) -> npt.NDArray[np.uint8]:
    """The PNG decoded: (height, width, 3)."""
    with Image.open(io.BytesIO(key.png)) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        return np.asarray(image.convert("RGB"))


def _is_yellow(picture: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    yellow: npt.NDArray[np.bool_] = np.all(picture == np.array(YELLOW, dtype=np.uint8), axis=2)
    return yellow


def _lesion_mask(shape: tuple[int, int, int] = (SLICES, ROWS, COLUMNS)) -> Any:
    return np.zeros(shape, dtype=np.uint8)


def test_brain_window_maps_hu_to_grey() -> None:
    """W80/L40: 0 HU black, 40 HU mid grey, 80 HU white; beyond the window clipped."""
    voxels = _blank()
    bands = {0: -1000.0, 1: 0.0, 2: 20.0, 3: 40.0, 4: 80.0, 5: 1000.0}  # 6 column bands
    width = COLUMNS // len(bands)
    for band, hu in bands.items():
        voxels[:, :, band * width : (band + 1) * width] = hu
    mask = _lesion_mask()
    mask[2, 200:210, 10:20] = 1  # small lesion, away from where the grey values are read
    key = render_key_image(_volume(voxels), mask, 1, modality="CT", body_part="HEAD")
    grey = _picture(key)[:150]  # rows above the lesion
    expected = {0: 0, 1: 0, 2: 64, 3: 128, 4: 255, 5: 255}  # 20 HU: a quarter of 255
    for band, value in expected.items():
        patch = grey[:, band * width + 5 : (band + 1) * width - 5]
        assert np.all(patch[..., 0] == patch[..., 1]), "grey, not coloured"
        assert np.all(patch[..., 1] == patch[..., 2])
        assert np.all(np.abs(patch.astype(int) - value) <= 1), (band, np.unique(patch))


@pytest.mark.parametrize("body_part", ["BRAIN", "head"])
def test_brain_window_for_head_body_parts(body_part: str) -> None:
    voxels = _blank(40.0)
    voxels[:, :, : COLUMNS // 2] = 70.0  # white in a brain window, light grey in soft tissue
    mask = _lesion_mask()
    mask[1, 200:210, 200:210] = 1
    key = render_key_image(_volume(voxels), mask, 1, modality="CT", body_part=body_part)
    picture = _picture(key)
    assert abs(int(picture[50, 20, 0]) - 223) <= 1  # (70 - 0) / 80 * 255 = 223.1
    assert abs(int(picture[50, COLUMNS - 20, 0]) - 128) <= 1


@pytest.mark.parametrize("body_part", ["ABDOMEN", "CHEST", None])
def test_soft_tissue_window_for_other_ct(body_part: str | None) -> None:
    """W400/L40: -160 HU black, 240 white, 40 mid grey, 80 HU 153."""
    voxels = _blank()
    for band, hu in enumerate((-160.0, 40.0, 80.0, 240.0)):
        voxels[:, :, band * 80 : (band + 1) * 80] = hu
    mask = _lesion_mask()
    mask[0, 200:210, 10:20] = 1
    key = render_key_image(_volume(voxels), mask, 1, modality="CT", body_part=body_part)
    row = _picture(key)[100, :, 0].astype(int)
    for band, value in enumerate((0, 128, 153, 255)):  # (80 + 160) / 400 * 255 = 153
        assert np.all(np.abs(row[band * 80 + 5 : (band + 1) * 80 - 5] - value) <= 1)


def test_other_modalities_stretch_the_slice_between_its_1st_and_99th_percentile() -> None:
    """An MR slice whose value grows with its column (0..319, each column 256 pixels, so each
    holds 1/320 of them): the 1st percentile falls in column 3 (columns 0-2 hold 0.94%), the
    99th in column 316; columns 0-2 are black, 317-319 white, 160 mid grey
    ((160 - 3) / (316 - 3) * 255 = 127.9)."""
    voxels = np.broadcast_to(np.arange(COLUMNS, dtype=np.float32), (SLICES, ROWS, COLUMNS))
    volume = _volume(np.ascontiguousarray(voxels * 7 + 500), sop_class=MRImageStorage)
    mask = _lesion_mask()
    mask[3, 200:210, 100:110] = 2
    key = render_key_image(volume, mask, 2, modality="MR", body_part="HEAD")
    row = _picture(key)[50, :, 0].astype(int)
    assert np.all(row[:3] == 0)
    assert np.all(row[317:] == 255)
    assert abs(row[160] - 128) <= 1
    assert np.all(np.diff(row) >= 0), "grey rises with the value"
    assert key.sop_class_uid == MRImageStorage


def test_monochrome1_is_shown_inverted() -> None:
    voxels = _blank(0.0)
    voxels[:, :, COLUMNS // 2 :] = 80.0
    mask = _lesion_mask()
    mask[1, 200:210, 10:20] = 1
    volume = _volume(voxels, photometric="MONOCHROME1")
    picture = _picture(render_key_image(volume, mask, 1, modality="CT", body_part="HEAD"))
    assert picture[50, 20, 0] == 255  # 0 HU: black in MONOCHROME2, white here
    assert picture[50, COLUMNS - 20, 0] == 0


def test_key_slice_is_the_largest_cross_section() -> None:
    mask = _lesion_mask()
    # segment 1 on slices 1-4; slice 3 has the largest area (30x30 = 900 against 400, 600).
    mask[1, 100:120, 100:120] = 1
    mask[2, 100:120, 100:130] = 1
    mask[3, 100:130, 100:130] = 1
    mask[4, 100:110, 100:110] = 1
    mask[0, 0:100, 0:100] = 2  # a larger other segment elsewhere does not count
    volume = _volume(_blank(40.0))
    key = render_key_image(volume, mask, 1, modality="CT", body_part="HEAD")
    assert key.slice_index == 3
    assert key.sop_instance_uid == f"{UID_ROOT}4"
    assert key.sop_instance_uid == str(volume.datasets[3].SOPInstanceUID)
    assert key.sop_class_uid == CTImageStorage
    assert render_key_image(volume, mask, 2, modality="CT", body_part="HEAD").slice_index == 0


def test_a_tie_picks_the_lower_slice() -> None:
    mask = _lesion_mask()
    mask[4, 10:20, 10:20] = 1  # 100 pixels
    mask[2, 50:60, 200:210] = 1  # 100 pixels, elsewhere
    mask[3, 30:35, 30:35] = 1
    key = render_key_image(_volume(_blank()), mask, 1, modality="CT", body_part=None)
    assert key.slice_index == 2


def test_outline_lies_on_the_lesions_boundary() -> None:
    """A 40x50 rectangle (rows 100-139, columns 150-199) of 80 HU on 0 HU: yellow only along
    its edge (within 2 pixels, inside or out), on all four sides, never in its middle."""
    voxels = _blank(0.0)
    voxels[2, 100:140, 150:200] = 80.0
    mask = _lesion_mask()
    mask[2, 100:140, 150:200] = 1
    key = render_key_image(_volume(voxels), mask, 1, modality="CT", body_part="HEAD")
    picture = _picture(key)
    yellow = _is_yellow(picture)[:ROWS, :COLUMNS]
    rows, columns = np.nonzero(yellow)
    assert rows.size > 0
    near_edge = (
        (np.abs(rows - 100) <= 2)
        | (np.abs(rows - 139) <= 2)
        | (np.abs(columns - 150) <= 2)
        | (np.abs(columns - 199) <= 2)
    )
    within = (rows >= 98) & (rows <= 141) & (columns >= 148) & (columns <= 201)
    assert np.all(near_edge & within)
    for side in (yellow[100:103, 150:200], yellow[137:140, 150:200]):  # top, bottom
        assert np.all(side.any(axis=0)), "every column of the top and bottom edges is drawn"
    for side in (yellow[100:140, 150:153], yellow[100:140, 197:200]):  # left, right
        assert np.all(side.any(axis=1)), "every row of the left and right edges is drawn"
    middle = picture[110:130, 160:190]
    assert not _is_yellow(middle).any()
    assert np.all(middle == 255), "the lesion's inside shows its own grey (80 HU: white)"
    assert not _is_yellow(picture[:, :90]).any()  # nothing far from the lesion


def test_caption_band_marks_the_bottom_of_any_image() -> None:
    """On a uniformly white and a uniformly black image alike, the bottom rows hold a dark
    band (dark pixels where the image is white) with light writing on it."""
    mask = _lesion_mask()
    mask[1, 10:20, 10:20] = 1
    for hu in (80.0, 0.0):  # white, black in the brain window
        key = render_key_image(_volume(_blank(hu)), mask, 1, modality="CT", body_part="HEAD")
        picture = _picture(key).astype(int)
        bottom = picture[-max(12, key.height // 12) :, :, 0]
        dark_rows = (bottom < 64).mean(axis=1) > 0.5  # rows mostly dark: the band
        assert dark_rows.any(), hu
        band = bottom[dark_rows]
        assert (band > 192).sum() >= 50, "light caption pixels on the band"
        top = picture[: ROWS // 2, 100:, 0]
        assert np.all(top == (255 if hu else 0)), "the image above is left as it is"


def test_png_decodes_to_the_stated_size() -> None:
    mask = _lesion_mask()
    mask[2, 100:110, 100:110] = 1
    key = render_key_image(_volume(_blank(40.0)), mask, 1, modality="CT", body_part="HEAD")
    with Image.open(io.BytesIO(key.png)) as image:
        assert image.format == "PNG"
        assert image.size == (key.width, key.height)
    assert key.width == COLUMNS  # 256 pixels and more: not enlarged
    assert key.height >= ROWS


def test_small_images_are_enlarged_so_the_caption_fits() -> None:
    """A 40x60 slice comes out at least 256 pixels a side, a whole multiple of the slice, with
    the lesion where the enlargement puts it."""
    rows, columns = 40, 60
    voxels = _blank(0.0, (3, rows, columns))
    voxels[1, 10:20, 30:40] = 80.0
    mask = _lesion_mask((3, rows, columns))
    mask[1, 10:20, 30:40] = 1
    key = render_key_image(_volume(voxels), mask, 1, modality="CT", body_part="HEAD")
    assert key.width >= 256
    assert key.width % columns == 0
    factor = key.width // columns
    assert key.height >= rows * factor >= 256
    picture = _picture(key)
    assert picture.shape[:2] == (key.height, key.width)
    inside = picture[15 * factor, 35 * factor]  # the lesion's middle, enlarged
    assert tuple(inside) == (255, 255, 255)
    assert tuple(picture[5 * factor, 5 * factor]) == (0, 0, 0)
    yellow_rows, yellow_columns = np.nonzero(_is_yellow(picture))
    assert yellow_rows.size > 0
    assert yellow_rows.min() >= 10 * factor
    assert yellow_rows.max() < 20 * factor
    assert yellow_columns.min() >= 30 * factor
    assert yellow_columns.max() < 40 * factor
    band = picture[rows * factor :, :, 0]
    assert (band > 192).sum() >= 50, "the caption is written below the enlarged image"


@pytest.mark.parametrize(
    ("flips", "where"),
    [
        ((False, False), "top-left"),
        ((True, False), "bottom-left"),
        ((False, True), "top-right"),
        ((True, True), "bottom-right"),
    ],
)
def test_in_plane_flips_show_the_slice_as_the_source_stores_it(
    flips: tuple[bool, bool], where: str
) -> None:
    """A white lesion in the canonical top-left corner (rows 10-39, columns 20-59). Flipped
    rows put canonical row r at ROWS - 1 - r, flipped columns column c at COLUMNS - 1 - c."""
    voxels = _blank(0.0)
    voxels[2, 10:40, 20:60] = 80.0
    mask = _lesion_mask()
    mask[2, 10:40, 20:60] = 1
    key = render_key_image(_volume(voxels, flips=flips), mask, 1, modality="CT", body_part="HEAD")
    picture = _picture(key)[:ROWS, :COLUMNS]
    row_range = (ROWS - 40, ROWS - 10) if "bottom" in where else (10, 40)
    column_range = (COLUMNS - 60, COLUMNS - 20) if "right" in where else (20, 60)
    white = np.all(picture == 255, axis=2)
    lesion = np.zeros((ROWS, COLUMNS), dtype=bool)
    lesion[slice(*row_range), slice(*column_range)] = True
    assert not white[~lesion].any(), "the image is flipped with the mask"
    assert white[lesion].sum() > 0.5 * lesion.sum()
    yellow_rows, yellow_columns = np.nonzero(_is_yellow(picture))
    assert yellow_rows.size > 0
    assert row_range[0] <= yellow_rows.min()
    assert yellow_rows.max() < row_range[1]
    assert column_range[0] <= yellow_columns.min()
    assert yellow_columns.max() < column_range[1]


def test_an_empty_segment_raises() -> None:
    mask = _lesion_mask()
    mask[1, 10:20, 10:20] = 1
    volume = _volume(_blank())
    with pytest.raises(ValueError, match="empty"):
        render_key_image(volume, mask, 2, modality="CT", body_part="HEAD")
    with pytest.raises(ValueError, match="empty"):
        render_key_image(volume, _lesion_mask(), 1, modality="CT", body_part="HEAD")


def test_background_and_a_mask_of_another_shape_are_refused() -> None:
    mask = _lesion_mask()
    mask[1, 10:20, 10:20] = 1
    volume = _volume(_blank())
    with pytest.raises(ValueError, match="background"):
        render_key_image(volume, mask, 0, modality="CT", body_part="HEAD")
    with pytest.raises(ValueError, match="shape"):
        render_key_image(volume, mask[:, :, :-1], 1, modality="CT", body_part="HEAD")
