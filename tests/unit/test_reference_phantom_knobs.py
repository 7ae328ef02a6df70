"""The phantom's drift knobs: more image noise, fainter lesions; their defaults change nothing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from workers.models.reference.phantom import generate_phantom

SMALL = 128  # the same anatomy over the same field of view, fast


@pytest.mark.parametrize(("seed", "lesion"), [(3, True), (4, False), (5, None)])
def test_the_defaults_leave_the_phantom_bit_identical(seed: int, lesion: bool | None) -> None:
    plain = generate_phantom(seed, lesion=lesion, matrix=SMALL)
    knobs = generate_phantom(
        seed, lesion=lesion, matrix=SMALL, noise_scale=1.0, lesion_contrast_hu=0.0
    )
    assert np.array_equal(plain.hu, knobs.hu)
    assert np.array_equal(plain.mask, knobs.mask)
    assert plain.lesions == knobs.lesions


def test_noise_scale_multiplies_the_same_noise() -> None:
    # Only the noise term changes, so hu(k) - hu(1) is (k - 1) times the seed's noise, rounded.
    volumes = {k: generate_phantom(6, lesion=True, matrix=SMALL, noise_scale=k) for k in (1, 5, 9)}
    base = volumes[1].hu.astype(np.float64)
    soft = (base > -100) & (base < 200)  # away from the -1024 clip in the air
    four = (volumes[5].hu - base)[soft]
    eight = (volumes[9].hu - base)[soft]
    assert np.std(eight) / np.std(four) == pytest.approx(2.0, rel=0.05)
    assert np.corrcoef(four, eight)[0, 1] > 0.99
    assert volumes[9].lesions == volumes[1].lesions
    assert np.array_equal(volumes[9].mask, volumes[1].mask)


def test_lesion_contrast_changes_only_the_lesions() -> None:
    plain = generate_phantom(8, lesion=True, matrix=SMALL)
    faint = generate_phantom(8, lesion=True, matrix=SMALL, lesion_contrast_hu=-20.0)
    assert np.array_equal(plain.mask, faint.mask)
    for before, after in zip(plain.lesions, faint.lesions, strict=True):
        assert after.mean_hu == pytest.approx(before.mean_hu - 20)
        assert after.volume_ml == before.volume_ml
    difference = faint.hu.astype(np.int32) - plain.hu
    lesion = plain.mask > 0
    assert (difference <= 0).all()
    assert float(np.median(difference[lesion])) <= -15
    near = ndimage.binary_dilation(lesion, iterations=3)
    assert not difference[~near].any()


@pytest.mark.parametrize(
    ("noise_scale", "lesion_contrast_hu", "named"),
    [
        (-1.0, 0.0, "noise_scale"),
        (float("nan"), 0.0, "noise_scale"),
        (1.0, float("inf"), "lesion_contrast_hu"),
    ],
)
def test_knobs_out_of_range_are_refused(
    noise_scale: float, lesion_contrast_hu: float, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        generate_phantom(
            1, matrix=32, noise_scale=noise_scale, lesion_contrast_hu=lesion_contrast_hu
        )
