"""The host side of generation (`bgjax.sampling.host`): the feather, photos placed on a canvas, image files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bgjax.fileio import save_image
from bgjax.sampling.host import feather, place_photo
from tools.time_feather import by_dilations


@pytest.mark.parametrize("radius", [0, 1, 3, 12])
def test_feather_is_the_mean_of_the_dilations(radius):
    """One distance transform gives, bit for bit, the feather's definition, the mean of the mask dilated by
    0 .. radius px (`tools/time_feather.py` times both): shapes with holes, two parts, a part at the border."""
    rng = np.random.default_rng(radius)
    mask = np.zeros((70, 90), bool)
    yy, xx = np.mgrid[:70, :90]
    mask |= ((yy - 30) / 18) ** 2 + ((xx - 40) / 25) ** 2 <= 1
    mask &= ~(((yy - 30) / 5) ** 2 + ((xx - 40) / 6) ** 2 <= 1)  # a hole
    mask[50:70, 75:90] = True  # at the border
    mask |= rng.random(mask.shape) > 0.995  # single pixels
    got = feather(mask, radius)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, by_dilations(mask, radius))
    assert (got[mask] == 1).all() and got.min() == 0


def test_photo_fitted_into_a_canvas():
    photo = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:40] = 255
    colour, placed, inside = place_photo(photo, mask, (64, 128))  # a tall canvas: the photo's width fits
    assert colour.shape == (128, 64, 3) and placed.shape == inside.shape == (128, 64)
    # 60 x 40 scaled by 64 / 60 to 64 x 43, centred: rows 42 .. 84, every column
    np.testing.assert_array_equal(np.flatnonzero(inside.any(1)), np.arange(42, 85))
    assert inside[42:85].all()
    assert (colour[~inside] == 255).all() and not placed[~inside].any()
    product = placed >= 128
    np.testing.assert_array_equal(np.flatnonzero(product.any(1)), np.arange(53, 74))  # rows 10..29 of 40, scaled
    np.testing.assert_array_equal(np.flatnonzero(product.any(0)), np.arange(21, 43))  # columns 20..39 of 60


@pytest.mark.parametrize(("image_format", "name"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_save_image_formats_and_quality(tmp_path, image_format, name):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), np.uint8))
    sizes = {}
    for quality in (30, 95):
        path = tmp_path / f"q{quality}.{image_format}"
        save_image(image, path, image_format, quality)
        with Image.open(path) as read:
            assert read.format == name and read.size == (96, 64)
            pixels = np.asarray(read.convert("RGB"))
        sizes[quality] = path.stat().st_size
    if image_format == "png":
        np.testing.assert_array_equal(pixels, np.asarray(image))  # lossless, the quality ignored
        assert sizes[30] == sizes[95]
    else:
        assert sizes[30] < sizes[95]
    with pytest.raises(ValueError, match="quality: expected an int from 1 to 100, got 101"):
        save_image(image, tmp_path / "x", image_format, 101)
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".x*"))
