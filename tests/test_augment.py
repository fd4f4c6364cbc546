"""bgjax.data.augment: crop/resize/flip and PG's self-supervised perturbations; bgjax.data.pg_render:
the same perturbations rendered in JAX, bit-identical to the numpy reference."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from bgjax.data.augment import (
    CropConfig,
    PGAugmentConfig,
    binary_mask,
    crop_resize,
    crop_resize_encoded,
    dilate,
    draw_pg_batch,
    draw_pg_params,
    fill_spans,
    pg_augment,
    render_pg,
    sample_crop,
    to_float,
    translate,
)
from bgjax.data.images import decode_mask, decode_rgb, encode_jpeg, encode_png
from bgjax.data.pg_render import pg_render

OFF = PGAugmentConfig(dilation_px=(0, 0), rect_probability=0.0, blob_probability=0.0, max_shift=0.0,
                      mix_probability=0.0)


def brute_dilate(mask: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(mask, bool)
    for y, x in zip(*np.nonzero(mask), strict=True):
        out[max(0, y - k):y + k + 1, max(0, x - k):x + k + 1] = True
    return out


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth shading, stripes and mild noise: JPEG content like a photo's, not like pure noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / rng.uniform(8, 30)) * 60 + yy / h * 120 + 40)[..., None] * rng.uniform(0.6, 1.0, 3)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def random_product(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A 0/255 mask: a rectangle or an ellipse of random size anywhere (possibly touching edges)."""
    ph, pw = int(rng.integers(2, h + 1)), int(rng.integers(2, w + 1))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        mask[y0:y0 + ph, x0:x0 + pw] = 255
    else:
        yy, xx = np.mgrid[0:ph, 0:pw]
        inside = ((yy + 0.5 - ph / 2) / (ph / 2)) ** 2 + ((xx + 0.5 - pw / 2) / (pw / 2)) ** 2 <= 1
        mask[y0:y0 + ph, x0:x0 + pw] = np.where(inside, 255, 0)
    return mask


# ---------------------------------------------------------------------------------------------
# conversions


def test_to_float():
    image = np.array([[[0, 255, 128]]], np.uint8)
    assert to_float(image).dtype == np.float32
    np.testing.assert_allclose(to_float(image), [[[-1.0, 1.0, 128 / 127.5 - 1]]], atol=1e-7)


def test_binary_mask_conventions():
    expect = np.array([[False, True]])
    for mask in (np.array([[0, 255]], np.uint8), np.array([[0, 1]], np.uint8), expect,
                 np.array([[0.0, 1.0]], np.float32), np.array([[[0], [255]]], np.uint8)):
        np.testing.assert_array_equal(binary_mask(mask), expect)


# ---------------------------------------------------------------------------------------------
# dilation, translation, masks, mixing


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_dilate_single_pixel_and_square_grow_by_exactly_k(k):
    mask = np.zeros((31, 29), bool)
    mask[15, 14] = True
    out = dilate(mask, k)
    np.testing.assert_array_equal(out, brute_dilate(mask, k))
    ys, xs = np.nonzero(out)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (15 - k, 15 + k, 14 - k, 14 + k)
    assert out.sum() == (2 * k + 1) ** 2

    square = np.zeros((31, 29), np.uint8)
    square[10:16, 9:13] = 255
    out = dilate(square, k)
    np.testing.assert_array_equal(out, brute_dilate(square > 0, k))
    ys, xs = np.nonzero(out)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10 - k, 15 + k, 9 - k, 12 + k)


def test_dilate_matches_brute_force_on_random_masks_and_at_edges():
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w = rng.integers(1, 40, 2)
        mask = rng.random((h, w)) < rng.uniform(0.0, 0.1)
        k = int(rng.integers(0, 12))
        np.testing.assert_array_equal(dilate(mask, k), brute_dilate(mask, k))
    assert dilate(np.zeros((5, 5), bool), 3).sum() == 0


def test_translate_zero_fill():
    a = np.arange(1, 13).reshape(3, 4)
    np.testing.assert_array_equal(translate(a, 1, -1), [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0]])
    np.testing.assert_array_equal(translate(a, 0, 0), a)
    assert not translate(a, 3, 0).any() and not translate(a, 0, -4).any()
    rgb = np.ones((4, 5, 3), np.float32)
    out = translate(rgb, -2, 2)
    assert out.shape == rgb.shape and out.dtype == rgb.dtype and out.sum() == 2 * 3 * 3


def test_random_shapes_make_a_superset_of_the_mask():
    rng = np.random.default_rng(2)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 25:35] = True
    cfg = dataclasses.replace(OFF, rect_probability=1.0, blob_probability=1.0, shape_size=(0.2, 0.4))
    image = random_image(rng, 64, 64)
    for _ in range(10):
        _, out = render_pg(image, mask, None, draw_pg_params(mask, rng, cfg))
        assert out.dtype == np.bool_ and np.all(out[mask]) and out.sum() > mask.sum()
    np.testing.assert_array_equal(render_pg(image, mask, None, draw_pg_params(mask, rng, OFF))[1], mask)


def test_shapes_are_fixed_size_whatever_was_drawn():
    """Unused shape slots are empty spans: the arrays' shapes depend on the config and H only."""
    rng = np.random.default_rng(16)
    cfg = PGAugmentConfig(rect_count=(0, 3), blob_count=(1, 2), mix_count=(0, 4))
    mask = random_product(rng, 30, 50)
    for _ in range(20):
        params = draw_pg_params(mask, rng, cfg)
        assert {k: v.shape for k, v in params.items()} == {
            "pg_dilation": (), "pg_shift": (2,), "pg_hole_spans": (5, 30, 2), "pg_mix_spans": (4, 30, 2)}
        assert all(v.dtype == np.int32 for v in params.values())
        spans = np.concatenate([params["pg_hole_spans"], params["pg_mix_spans"]])
        lo, hi = spans[..., 0], spans[..., 1]
        assert np.all((lo >= 0) & (lo <= hi) & (hi <= 50)) and np.all(lo[lo == hi] == 0)


def test_shape_spans_match_the_pixel_centre_tests():
    """Rectangles: rows/columns [round(c - s/2), round(c + s/2)); ellipses: pixel centres with
    (u/a)^2 + (v/b)^2 <= 1 in the ellipse's rotated frame (a pixel within 1e-9 of the border may
    go either way)."""
    from bgjax.data.augment import _ellipse_spans, _rectangle_spans

    rng = np.random.default_rng(17)
    shape = (45, 70)
    yy, xx = np.mgrid[0:45, 0:70] + 0.5
    for _ in range(50):
        cy, cx = rng.uniform(-10, 55), rng.uniform(-10, 80)
        h, w = rng.uniform(0, 40, 2)
        angle = rng.uniform(0, np.pi)
        got = fill_spans(_ellipse_spans(shape, cy, cx, h, w, angle)[None], 70)
        a, b = max(w / 2, 0.5), max(h / 2, 0.5)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        q = (u / a) ** 2 + (v / b) ** 2
        assert np.all((got == (q <= 1)) | (np.abs(q - 1) < 1e-9))
        got = fill_spans(_rectangle_spans(shape, cy, cx, h, w)[None], 70)
        rows = (yy - 0.5 >= round(cy - h / 2)) & (yy - 0.5 < round(cy + h / 2))
        cols = (xx - 0.5 >= round(cx - w / 2)) & (xx - 0.5 < round(cx + w / 2))
        np.testing.assert_array_equal(got, rows & cols)


def test_mixing_takes_the_other_image_in_the_regions():
    rng = np.random.default_rng(3)
    a, b = random_image(rng, 32, 48), random_image(rng, 32, 48)
    no_product = np.zeros((32, 48), bool)
    cfg = dataclasses.replace(OFF, mix_probability=1.0, mix_count=(2, 3))
    params = draw_pg_params(no_product, rng, cfg)
    regions = fill_spans(params["pg_mix_spans"], 48)
    assert regions.any() and not regions.all()
    c_pg, _ = render_pg(a, no_product, b, params)
    np.testing.assert_array_equal(c_pg, to_float(np.where(regions[..., None], b, a)))
    np.testing.assert_array_equal(render_pg(a, no_product, None, params)[0], to_float(a))
    assert not fill_spans(draw_pg_params(no_product, rng, OFF)["pg_mix_spans"], 48).any()


# ---------------------------------------------------------------------------------------------
# pg_augment


def test_pg_augment_identity_when_everything_is_off():
    rng = np.random.default_rng(4)
    image, other = random_image(rng, 40, 56), random_image(rng, 40, 56)
    mask = random_product(rng, 40, 56)
    c_pg, perturbed = pg_augment(image, mask, other, np.random.default_rng(0), OFF)
    keep = (mask > 0).astype(np.float32)
    assert c_pg.dtype == np.float32 and perturbed.dtype == np.float32
    np.testing.assert_array_equal(perturbed, keep)
    np.testing.assert_array_equal(c_pg, to_float(image) * (1 - keep)[..., None])
    assert not np.signbit(c_pg[keep > 0]).any()  # masked pixels are +0.0


def test_pg_augment_deterministic_per_seed():
    rng = np.random.default_rng(5)
    image, other, mask = random_image(rng, 64, 64), random_image(rng, 64, 64), random_product(rng, 64, 64)
    cfg = PGAugmentConfig(rect_probability=1.0, blob_probability=1.0, mix_probability=1.0)
    first = pg_augment(image, mask, other, np.random.default_rng(7), cfg)
    again = pg_augment(image, mask, other, np.random.default_rng(7), cfg)
    other_seed = pg_augment(image, mask, other, np.random.default_rng(8), cfg)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(first, other_seed, strict=True))


def test_pg_augment_outputs_and_value_ranges():
    rng = np.random.default_rng(6)
    image, other, mask = random_image(rng, 48, 80), random_image(rng, 48, 80), random_product(rng, 48, 80)
    c_pg, perturbed = pg_augment(image, mask, other, rng, PGAugmentConfig(mix_probability=1.0))
    assert c_pg.shape == (48, 80, 3) and perturbed.shape == (48, 80)
    assert c_pg.min() >= -1 and c_pg.max() <= 1
    assert set(np.unique(perturbed)) <= {0.0, 1.0}
    assert np.all(c_pg[perturbed > 0] == 0)


def test_perturbed_mask_covers_translated_dilated_product():
    """M' contains translate(dilate(M, k), delta) for the k and delta drawn: every translated
    product pixel still in frame is covered by M'.

    pg_augment draws k and delta before the shapes and the mix, so the same seed with shapes off
    gives M'_0 = translate(dilate(M, k), delta) exactly (checked against a brute-force search
    over k and delta); with shapes on, M' must contain M'_0."""
    rng = np.random.default_rng(9)
    size = 64
    on = PGAugmentConfig(dilation_px=(16, 40), max_shift=0.2, rect_probability=1.0, blob_probability=1.0,
                         mix_probability=1.0)
    off = dataclasses.replace(on, rect_probability=0.0, blob_probability=0.0, mix_probability=0.0)
    k_range = range(round(16 * size / 512), round(40 * size / 512) + 1)  # 2..5 px at 64 px
    max_d = round(0.2 * size)
    shifts = [(dy, dx) for dy in range(-max_d, max_d + 1) for dx in range(-max_d, max_d + 1)]
    for trial in range(8):
        image, other = random_image(rng, size, size), random_image(rng, size, size)
        mask = np.zeros((size, size), bool)  # a product within a random half-size window
        y, x = (int(v) for v in rng.integers(0, size // 2 + 1, 2))
        mask[y:y + size // 2, x:x + size // 2] = random_product(rng, size // 2, size // 2) > 0
        base = pg_augment(image, mask, other, np.random.default_rng(trial), off)[1] > 0
        full = pg_augment(image, mask, other, np.random.default_rng(trial), on)[1] > 0
        assert np.all(full[base]) and full.sum() >= base.sum()
        dilated = {k: brute_dilate(mask, k) for k in k_range}
        matches = [(k, d) for k in k_range for d in shifts if np.array_equal(translate(dilated[k], *d), base)]
        assert matches, f"trial {trial}: M' with shapes off is not a translated dilation of M"
        _, (dy, dx) = matches[0]
        ys, xs = np.nonzero(mask)
        ys, xs = ys + dy, xs + dx
        inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        assert np.all(full[ys[inside], xs[inside]])


def test_product_never_visible_without_translation():
    """Copy shortcut: with delta = 0, no pixel of the product is left unmasked in c_pg, whatever
    the dilation, shapes and mixing do."""
    rng = np.random.default_rng(11)
    cfg = PGAugmentConfig(max_shift=0.0, dilation_px=(0, 25), rect_probability=0.5, blob_probability=0.5,
                          mix_probability=1.0)
    for trial in range(30):
        h, w = (int(v) for v in rng.integers(16, 72, 2))
        image, other = random_image(rng, h, w), random_image(rng, h, w)
        mask = random_product(rng, h, w)
        c_pg, perturbed = pg_augment(image, mask, other, np.random.default_rng(trial), cfg)
        keep = mask > 0
        assert np.all(perturbed[keep] == 1)
        assert np.all(c_pg[keep] == 0)


# ---------------------------------------------------------------------------------------------
# the JAX render (pg_render) against the numpy reference (render_pg)


def assert_bit_identical(got, want, what):
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=what)  # -0.0 != +0.0


def assert_render_matches_numpy(images, masks, params):
    """pg_render on the batch == render_pg per image, each mixed with its partner (here the next image)."""
    c_pg, perturbed = pg_render({"image": images, "pg_partner_image": np.roll(images, -1, 0), "mask": masks, **params})
    for i in range(len(images)):
        want_c, want_m = render_pg(images[i], masks[i], images[(i + 1) % len(images)],
                                   {k: v[i] for k, v in params.items()})
        assert_bit_identical(perturbed[i], want_m, f"M' of image {i}")
        assert_bit_identical(c_pg[i], want_c, f"c_pg of image {i}")


def make_batch(rng, size=(40, 56), batch=4):
    images = np.stack([random_image(rng, *size) for _ in range(batch)])
    masks = np.stack([random_product(rng, *size) > 0 for _ in range(batch)]).astype(np.uint8)
    masks[-1] = 0  # no product: shapes anywhere, nothing to dilate
    return images, masks


@pytest.mark.parametrize("name", ["default", "all_on", "far", "off", "no_shape_slots"])
def test_jax_render_is_bit_identical_to_numpy(name):
    cfg = {
        "default": PGAugmentConfig(),
        "all_on": PGAugmentConfig(rect_probability=1.0, blob_probability=1.0, mix_probability=1.0, mix_count=(2, 5),
                                  max_shift=0.3, shape_size=(0.05, 0.6)),
        # shifts up to the whole frame (|delta| = H or W: nothing left), dilations wider than the image
        "far": PGAugmentConfig(max_shift=0.99, dilation_px=(0, 800), mix_probability=1.0, mix_ellipse_probability=1.0),
        "off": OFF,
        "no_shape_slots": PGAugmentConfig(rect_count=(0, 0), blob_count=(0, 0), mix_count=(0, 0)),
    }[name]
    rng = np.random.default_rng(20)
    images, masks = make_batch(rng)
    for seed in range(6):
        assert_render_matches_numpy(images, masks, draw_pg_batch(masks, np.random.default_rng(seed), cfg))


def test_jax_render_edge_cases_match_numpy():
    """Hand-made parameters: shifts beyond the frame, k = 0, k beyond the frame, no shapes, empty mix,
    shapes covering everything."""
    rng = np.random.default_rng(21)
    h, w = 40, 56
    images, masks = make_batch(rng, (h, w), batch=6)
    full = np.broadcast_to(np.array([0, w], np.int32), (1, h, 2))
    empty = np.zeros((1, h, 2), np.int32)
    params = {
        "pg_dilation": np.array([0, 0, 3, 100, 7, 1], np.int32),
        "pg_shift": np.array([[h, 0], [0, -w], [h + 5, -w - 9], [-3, 4], [0, 0], [-h + 1, w - 1]], np.int32),
        "pg_hole_spans": np.stack([empty, full, empty, empty, full, empty]),
        "pg_mix_spans": np.stack([full, empty, empty, full, empty, empty]),
    }
    assert_render_matches_numpy(images, masks, params)
    c_pg, perturbed = pg_render({"image": images, "pg_partner_image": images, "mask": masks, **params})
    assert not np.asarray(perturbed[0]).any() and not np.asarray(c_pg[0]).any()  # shifted out of frame
    assert np.asarray(perturbed[4]).all() and not np.asarray(c_pg[4]).any()  # a hole over everything


def test_jax_dilation_matches_brute_force():
    rng = np.random.default_rng(22)
    for _ in range(4):
        h, w = (int(v) for v in rng.integers(5, 40, 2))
        masks = (rng.random((3, h, w)) < rng.uniform(0.0, 0.05, (3, 1, 1))).astype(np.uint8)
        ks = rng.integers(0, 12, 3).astype(np.int32)
        params = {"pg_dilation": ks, "pg_shift": np.zeros((3, 2), np.int32),
                  "pg_hole_spans": np.zeros((3, 0, h, 2), np.int32), "pg_mix_spans": np.zeros((3, 0, h, 2), np.int32)}
        blank = np.zeros((3, h, w, 3), np.uint8)
        _, perturbed = pg_render({"image": blank, "pg_partner_image": blank, "mask": masks, **params})
        for i in range(3):
            np.testing.assert_array_equal(perturbed[i], brute_dilate(masks[i], int(ks[i])))


# ---------------------------------------------------------------------------------------------
# crop_resize


def test_crop_resize_keeps_the_whole_product():
    rng = np.random.default_rng(12)
    cfg = CropConfig(resolution=64)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(8, 160, 2))
        image, mask = random_image(rng, h, w), random_product(rng, h, w)
        keep = mask > 0
        ys, xs = np.nonzero(keep)
        top, left, side = sample_crop(mask, np.random.default_rng(trial), cfg)
        # the crop square contains the product bbox
        assert top <= ys.min() and ys.max() < top + side and left <= xs.min() and xs.max() < left + side
        if side <= min(h, w):  # in-image whenever possible
            assert 0 <= top <= h - side and 0 <= left <= w - side
        else:
            assert side == max(np.ptp(ys), np.ptp(xs)) + 1
        out, out_mask = crop_resize(image, mask, np.random.default_rng(trial), cfg)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        assert out_mask.shape == (64, 64) and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= {0, 255}
        n = int((out_mask > 0).sum())
        assert n > 0
        # area preserved up to resampling at the boundary: nothing was clipped
        scale = 64 / side
        expected = keep.sum() * scale**2
        boundary = 2 * ((np.ptp(ys) + 1) + (np.ptp(xs) + 1)) * scale + 8
        assert abs(n - expected) <= boundary + 0.05 * expected, (trial, n, expected, boundary)


def test_crop_resize_scale_and_product_fraction():
    mask = np.zeros((200, 300), np.uint8)
    mask[90:110, 140:160] = 255  # 20 px product
    cfg = CropConfig(resolution=32, scale_range=(0.1, 1.0), min_product_fraction=0.5)
    sides = {sample_crop(mask, np.random.default_rng(s), cfg)[2] for s in range(50)}
    assert min(sides) >= 20 and max(sides) <= 40  # at least half the crop is product extent
    cfg = CropConfig(resolution=32, scale_range=(0.5, 0.8), min_product_fraction=0.0)
    sides = {sample_crop(mask, np.random.default_rng(s), cfg)[2] for s in range(50)}
    assert min(sides) >= 100 and max(sides) <= 160 and len(sides) > 5
    sides = {sample_crop(np.zeros((200, 300), np.uint8), np.random.default_rng(s), cfg)[2] for s in range(20)}
    assert min(sides) >= 100 and max(sides) <= 160


def test_crop_resize_pads_a_product_larger_than_the_image_side():
    rng = np.random.default_rng(14)
    image = random_image(rng, 20, 100)
    mask = np.zeros((20, 100), np.uint8)
    mask[5:15, 10:90] = 255  # 80 px wide in a 20 px tall image
    top, left, side = sample_crop(mask, np.random.default_rng(0), CropConfig(resolution=40))
    assert side == 80 and left == 10 and -60 <= top <= 0
    out, out_mask = crop_resize(image, mask, np.random.default_rng(0), CropConfig(resolution=80, flip_probability=0))
    ys, xs = np.nonzero(out_mask)
    assert xs.min() == 0 and xs.max() == 79 and np.ptp(ys) + 1 == 10
    np.testing.assert_array_equal(out[-top:-top + 20], image[:, 10:90])  # same size: no resampling


def test_crop_resize_flip_is_consistent_and_deterministic():
    rng = np.random.default_rng(15)
    image, mask = random_image(rng, 90, 70), random_product(rng, 90, 70)
    plain = crop_resize(image, mask, np.random.default_rng(3), CropConfig(resolution=48, flip_probability=0.0))
    flipped = crop_resize(image, mask, np.random.default_rng(3), CropConfig(resolution=48, flip_probability=1.0))
    np.testing.assert_array_equal(flipped[0], plain[0][:, ::-1])
    np.testing.assert_array_equal(flipped[1], plain[1][:, ::-1])
    again = crop_resize(image, mask, np.random.default_rng(3), CropConfig(resolution=48, flip_probability=0.0))
    for x, y in zip(plain, again, strict=True):
        np.testing.assert_array_equal(x, y)
    # image and mask stay aligned: the product is the only red thing in the image
    red = np.zeros((90, 70, 3), np.uint8)
    red[mask > 0] = (255, 0, 0)
    out, out_mask = crop_resize(red, mask, np.random.default_rng(4), CropConfig(resolution=48, flip_probability=1.0))
    inside = out_mask > 0
    assert out[inside, 0].mean() > 200 and out[~inside, 0].mean() < 60


def test_crop_from_encoded_bytes_equals_the_crop_of_decoded_arrays():
    """crop_resize_encoded decodes in PIL straight into the resize: the same pixels as decoding to
    numpy first, whenever the JPEG is decoded at full scale (crops under twice the resolution, or
    jpeg_draft off)."""
    rng = np.random.default_rng(17)
    for trial in range(30):
        h, w = (int(v) for v in rng.integers(40, 200, 2))
        image, mask = photo(rng, h, w), random_product(rng, h, w)
        jpg, png = encode_jpeg(image), encode_png(mask)
        cfg = CropConfig(resolution=int(rng.choice([24, 48, 96])), pad_mode="reflect")
        want = crop_resize(decode_rgb(jpg), decode_mask(png), np.random.default_rng(trial), cfg)
        side = sample_crop(mask, np.random.default_rng(trial), cfg)[2]
        for c in [dataclasses.replace(cfg, jpeg_draft=False)] + ([cfg] if side < 2 * cfg.resolution else []):
            got = crop_resize_encoded(jpg, png, np.random.default_rng(trial), c)
            for x, y in zip(got, want, strict=True):
                np.testing.assert_array_equal(x, y)


def test_jpeg_draft_decoding_stays_within_tolerance_of_a_full_decode():
    """Crops at least twice the resolution are reduced by 2, 4 or 8 first: a JPEG in libjpeg's DCT
    (jpeg_draft), else by block means. Tolerance between the two, per crop: the mask identical; the
    image's mean |difference| <= 1.5 levels, its 99th percentile <= 6 and its maximum <= 24
    (measured: 0.6, 3 and 10 at worst here, on noisy photos)."""
    from bgjax.data.augment import _reduction

    rng = np.random.default_rng(18)
    scales = set()
    for trial in range(12):
        size = int(rng.choice([480, 640, 1500]))
        image, mask = photo(rng, size, size), np.zeros((size, size), np.uint8)
        mask[size // 3:size // 2, size // 3:size // 2] = 255
        jpg, png = encode_jpeg(image, 90), encode_png(mask)
        cfg = CropConfig(resolution=int(rng.choice([64, 100, 160])), min_product_fraction=0.0)
        scales.add(_reduction(sample_crop(mask, np.random.default_rng(trial), cfg)[2], cfg.resolution))
        full = crop_resize_encoded(jpg, png, np.random.default_rng(trial), dataclasses.replace(cfg, jpeg_draft=False))
        draft = crop_resize_encoded(jpg, png, np.random.default_rng(trial), cfg)
        np.testing.assert_array_equal(draft[1], full[1])
        diff = np.abs(draft[0].astype(np.int16) - full[0].astype(np.int16))
        assert diff.mean() <= 1.5 and np.percentile(diff, 99) <= 6 and diff.max() <= 24, (trial, diff.max())
    assert scales >= {2, 4, 8}


def test_resize_does_not_alias_when_shrinking_2x_or_more():
    """A one-pixel checkerboard shrunk 2x to 13x must come out flat grey (every output pixel within
    1 level of 127.5; measured 0.5), as an antialiased filter gives; plain bilinear sampling of it
    is off by 32 levels on average. (Between 1x and 2x the bilinear resize still aliases a little.)
    On photos the output stays within 4.5 levels (mean |difference|; measured <= 3.7, pixel noise
    at 1.8x) of PIL's antialiased bilinear filter over the same crop."""
    yy, xx = np.mgrid[:900, :900]
    board = np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    mask = np.zeros((900, 900), np.uint8)
    mask[440:460, 440:460] = 255
    for resolution in (64, 100, 200, 400):
        cfg = CropConfig(resolution=resolution, min_product_fraction=0.0)
        out, _ = crop_resize(board, mask, np.random.default_rng(resolution), cfg)
        assert np.abs(out.astype(np.float32) - 127.5).max() <= 1, resolution
    rng = np.random.default_rng(19)
    for trial in range(10):
        size = int(rng.choice([200, 500, 900]))
        image = photo(rng, size, size)
        cfg = CropConfig(resolution=int(rng.choice([64, 128, 256])), min_product_fraction=0.0, flip_probability=0.0)
        top, left, side = sample_crop(mask[:size, :size], np.random.default_rng(trial), cfg)
        out, _ = crop_resize(image, mask[:size, :size], np.random.default_rng(trial), cfg)
        want = Image.fromarray(image).resize((cfg.resolution,) * 2, Image.Resampling.BILINEAR,
                                             box=(left, top, left + side, top + side))
        assert np.abs(out.astype(np.int16) - np.asarray(want, np.int16)).mean() <= 4.5, (trial, side)


def test_encoded_crop_takes_pixels_as_stored_ignoring_exif_orientation():
    """Records hold upright pixels (the converters apply EXIF orientation): a stray orientation tag
    must not rotate the image away from its mask (PIL's raw decode is the reference)."""
    rng = np.random.default_rng(20)
    image, mask = photo(rng, 60, 80), random_product(rng, 60, 80)
    tagged = Image.fromarray(image)
    exif = tagged.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    tagged.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    cfg = CropConfig(resolution=32)
    got = crop_resize_encoded(buf.getvalue(), encode_png(mask), np.random.default_rng(0), cfg)
    want = crop_resize(decode_rgb(buf.getvalue()), mask, np.random.default_rng(0), cfg)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, y)


def test_configs_validate():
    with pytest.raises(ValueError):
        CropConfig(flip_probability=1.5)
    with pytest.raises(ValueError):
        CropConfig(scale_range=(0.8, 0.5))
    with pytest.raises(ValueError):
        PGAugmentConfig(dilation_px=(10, 5))
    with pytest.raises(ValueError):
        PGAugmentConfig(mix_probability=-0.1)
    with pytest.raises(ValueError):
        PGAugmentConfig(max_shift=1.0)
