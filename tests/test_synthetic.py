"""The synthetic generator: deterministic, exact masks, and category styles a statistic can tell apart."""

from __future__ import annotations

import json

import numpy as np

from bgjax.cli import main
from bgjax.data.synthetic import CATEGORIES, classify_background, make_sample, samples, save_rgba_cutout


def test_deterministic_per_index_and_seed():
    a, b, c = make_sample(3, seed=1), make_sample(3, seed=1), make_sample(3, seed=2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


def test_masks_are_exact_and_products_inside_the_frame():
    seen = set()
    for s in samples(36, seed=0, size=96):
        seen.add(s.category)
        product = s.mask > 0
        assert set(np.unique(s.mask)) == {0, 255}
        np.testing.assert_array_equal(s.image[~product], s.background[~product])
        assert 0.08 < product.mean() < 0.5
        assert not (product[0].any() or product[-1].any() or product[:, 0].any() or product[:, -1].any())
        np.testing.assert_array_equal(np.asarray(save_rgba_cutout(s))[..., 3], s.mask)
    assert seen == set(CATEGORIES)


def test_background_style_identifies_the_category():
    fresh = list(samples(60, seed=7, size=128))
    accuracy = np.mean([classify_background(s.image, s.mask) == s.category for s in fresh])
    assert accuracy >= 0.95, accuracy


def test_cli_writes_synthetic_records(tmp_path):
    assert main(["data", "synthetic", "--num", "12", "--size", "64", "--out", str(tmp_path), "--workers", "1"]) == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert (m["num_inputs"], m["num_written"], m["rejected"]) == (12, 12, [])
    assert sorted(m["categories"]) == sorted(CATEGORIES)
