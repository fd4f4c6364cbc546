"""The synthetic generator: deterministic, exact masks, and category styles a statistic can tell apart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bgjax.data.synthetic import (
    CATEGORIES,
    COVERAGE,
    background_style_features,
    classify_background,
    halo,
    make_sample,
    samples,
    save_rgba_cutout,
)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in ((a.image, b.image), (a.mask, b.mask), (a.background, b.background)))


def test_deterministic_per_index_seed_size_and_category():
    a = make_sample(3, seed=1)
    assert _same(a, make_sample(3, seed=1)) and a.id == make_sample(3, seed=1).id
    assert a.category == CATEGORIES[3] and a.image.shape == (128, 128, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(a.image, make_sample(3, seed=2).image)
    assert not np.array_equal(a.image, make_sample(9, seed=1).image)  # same category, other index
    b = make_sample(3, seed=1, size=64, category="table fan")
    assert b.category == "table fan" and b.image.shape == (64, 64, 3) and b.mask.shape == (64, 64)
    assert _same(b, make_sample(3, seed=1, size=64, category="table fan"))


def test_rejects_unknown_category_and_tiny_sizes():
    with pytest.raises(ValueError, match="unknown synthetic category"):
        make_sample(0, category="toaster")
    with pytest.raises(ValueError, match="size"):
        make_sample(0, size=8)


@pytest.mark.parametrize("size", [64, 128])
def test_masks_are_exact_and_products_inside_the_frame(size):
    for s in samples(24, seed=5, size=size):
        product = s.mask > 0
        assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) == {0, 255}
        np.testing.assert_array_equal(s.image[~product], s.background[~product])
        assert COVERAGE[0] <= product.mean() <= COVERAGE[1], (s.id, product.mean())
        assert not (product[0].any() or product[-1].any() or product[:, 0].any() or product[:, -1].any())
        # visibly different: product colour far from the background colour
        gap = np.linalg.norm(s.image[product].mean(0).astype(float) - s.image[~product].mean(0))
        assert gap > 25, (s.id, gap)


def test_every_category_in_order():
    got = [s.category for s in samples(2 * len(CATEGORIES), seed=0, size=64)]
    assert got == list(CATEGORIES) * 2
    assert all(" " in c for c in CATEGORIES) and len(set(CATEGORIES)) == len(CATEGORIES)


def test_rgba_cutout_alpha_is_the_mask():
    s = make_sample(4, seed=3, size=96)
    rgba = np.asarray(save_rgba_cutout(s))
    assert rgba.shape == (96, 96, 4)
    np.testing.assert_array_equal(rgba[..., 3], s.mask)
    inside = s.mask > 0
    np.testing.assert_array_equal(rgba[..., :3][inside], s.image[inside])
    assert not rgba[..., :3][~inside].any()


def test_features_use_background_pixels_only():
    s = make_sample(5, seed=2, size=96)
    f = background_style_features(s.image, s.mask)
    assert f.shape == (8,) and np.isfinite(f).all()
    np.testing.assert_allclose(f, background_style_features(s.background, s.mask), rtol=1e-6)
    assert not np.allclose(f, background_style_features(s.background, np.zeros_like(s.mask)))


@pytest.mark.parametrize("size", [64, 128])
def test_background_style_identifies_the_category(size):
    fresh = list(samples(60, seed=7, size=size))  # centroids come from another seed
    accuracy = np.mean([classify_background(s.image, s.mask) == s.category for s in fresh])
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("size", [64, 128])
def test_background_style_ignores_texture_finer_than_the_pattern(size):
    """A VAE at factor 4 invents texture inside its cells: pixel noise of 10 grey levels, or 2 px blotches of
    6, must not move a background to another category (it did for every rice cooker's gentle gradient when
    the statistics read single pixels)."""
    rng = np.random.default_rng(0)
    for block, level in ((1, 10), (2, 6)):
        right = {c: 0 for c in CATEGORIES}
        for s in samples(60, seed=8, size=size):
            noise = rng.normal(0, level, (size // block, size // block, 3)).repeat(block, 0).repeat(block, 1)
            image = np.clip(s.image + noise, 0, 255).astype(np.uint8)
            right[s.category] += classify_background(image, s.mask) == s.category
        assert min(right.values()) >= 9, (block, right)  # of 10 per category


def _distance_to_product(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt  # an independent account of "pixels from the product"

    return distance_transform_edt(mask < 128)


@pytest.mark.parametrize("size", [64, 128])
def test_halo_is_low_on_the_ground_truth_and_rises_with_a_rim_or_bleeding(size):
    """The ground truth's own level stays below 0.08 on every sample but the rice cooker's, whose vertical
    stripes (13 px apart at 64 px) can run along the body's straight sides, so that the 3 px ring lies on one
    stripe and the band beyond on the next: below 0.11 (these 24 samples: at most 0.105 at 64 px); plain
    and smooth styles stay below 0.03. A rim 1-2 px wide, halfway to white or to black, or the product's colour
    bleeding 2 px out, raises it by at least 0.03 on every sample, but for two of the rice cookers' 12 checks
    at 64 px: a dark rim or the product's colour on a ring that lies on one stripe, against a band on the
    next. A measure that looked at the product, at the wrong ring or at the whole background would miss a
    2-px rim on most samples."""
    missed = []
    for s in samples(24, seed=11, size=size):
        base = halo(s.image, s.mask)
        assert base < (0.11 if s.category == "rice cooker" else 0.08), (s.category, base)
        if s.category in ("coffee mug", "running shoe", "water bottle"):
            assert base < 0.03, (s.category, base)
        d = _distance_to_product(s.mask)
        rim = (d > 0) & (d <= 2)
        img = s.image.astype(np.float64)
        light, dark = img.copy(), img.copy()
        light[rim] += (255 - light[rim]) * 0.5
        dark[rim] *= 0.5
        bleed = img.copy()
        bleed[rim] = img[s.mask > 0].mean(0)
        missed += [(s.category, name) for name, changed in (("light", light), ("dark", dark), ("bleed", bleed))
                   if halo(changed.round().astype(np.uint8), s.mask) <= base + 0.03]
    assert len(missed) <= 2 and all(category == "rice cooker" for category, _ in missed), missed


def test_halo_reads_only_the_band_around_the_product():
    """Product pixels and background further than 8 px from the product do not enter it; the band does."""
    s = make_sample(3, seed=5, size=96)
    d = _distance_to_product(s.mask)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, s.image.shape, dtype=np.uint8)
    far_or_inside = ((d == 0) | (d > 8))[..., None]
    assert halo(np.where(far_or_inside, noise, s.image), s.mask) == halo(s.image, s.mask)
    near = ((d > 0) & (d <= 8))[..., None]
    assert halo(np.where(near, noise, s.image), s.mask) != halo(s.image, s.mask)
    with pytest.raises(ValueError, match="empty"):
        halo(s.image, np.zeros_like(s.mask))


def test_cli_writes_synthetic_records(tmp_path):
    from bgjax.cli import main

    assert main(["data", "synthetic", "--num", "12", "--size", "64", "--out", str(tmp_path), "--workers", "1"]) == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert (m["num_inputs"], m["num_written"], m["rejected"]) == (12, 12, [])
    assert sorted(m["categories"]) == sorted(CATEGORIES)
