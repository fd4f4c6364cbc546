"""Training augmentations, numpy on the host (they run inside data-loader workers).

Every function is deterministic given a `np.random.Generator`; every probability and range is a
field of a frozen config (`CropConfig`, `PGAugmentConfig`).

- `crop_resize`: a random square crop with scale jitter that keeps the whole product bounding box,
  resized to the training resolution, plus a random horizontal flip of image and mask together.
- `pg_augment`: the Personality-Wise Generator's self-supervised condition (docs/method.md, "PG
  self-supervision and the copy shortcut"):

      M'   = translate(randmask(dilate(M, k)), delta)
      I~   = I (1 - B) + I_rand B
      c_pg = translate(I~, delta) * (1 - M')        (I~ in [-1, 1]; masked pixels are 0.0 there)

  so PG sees a perturbed background whose product hole neither has the product's silhouette nor
  sits where the product is, and cannot learn to paste its input back.

Image convention: (H, W, 3) uint8 RGB. Mask convention: (H, W) uint8 0/255 (bool, 0/1 integers and
floats in [0, 1] are accepted too; see `binary_mask`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "CropConfig",
    "PGAugmentConfig",
    "binary_mask",
    "crop_resize",
    "dilate",
    "mix_regions",
    "pg_augment",
    "pg_perturb",
    "random_mask",
    "random_shapes",
    "sample_crop",
    "to_float",
    "translate",
]

_PAD_MODES = ("edge", "reflect", "symmetric")


def _check_probability(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _check_range(value: tuple, name: str, low: float = 0.0, high: float = math.inf) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be a (min, max) pair with {low} <= min <= max <= {high}, got {value}")


# ----------------------------------------------------------------------------------------------
# Conversions


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool product mask. uint8/int masks: 0/255 (> 127 is product), or 0/1 when the maximum
    is 1; bool as is; floats: > 0.5 is product. A trailing channel axis of size 1 is dropped."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask > (0 if mask.max(initial=0) <= 1 else 127)
    return mask > 0.5


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    return image


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    _check_image(image)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask is {mask.shape} but its image is {image.shape[:2]} (H, W)")


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) with exclusive ends, or None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


# ----------------------------------------------------------------------------------------------
# Crop / resize / flip


@dataclass(frozen=True)
class CropConfig:
    """Random square crop keeping the whole product, resize, horizontal flip.

    resolution: output side in pixels.
    scale_range: (min, max) crop side as a fraction of the image's shorter side (scale jitter).
        The side is never below the product's bounding-box extent (max of its height and width).
    min_product_fraction: the crop side is at most extent / min_product_fraction, i.e. the product
        bbox spans at least this fraction of the crop, unless scale_range's minimum forces a larger
        crop (a small product is then zoomed in as far as scale_range allows). 0 disables it.
    flip_probability: probability of a horizontal flip (image and mask together).
    pad_mode: numpy pad mode for the image when the product is larger than any in-image square
        ("edge", "reflect" or "symmetric"); the mask is padded with background.
    """

    resolution: int = 512
    scale_range: tuple[float, float] = (0.5, 1.0)
    min_product_fraction: float = 0.5
    flip_probability: float = 0.5
    pad_mode: str = "edge"

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        _check_range(self.scale_range, "scale_range", 0.0, 1.0)
        if self.scale_range[1] <= 0:
            raise ValueError("scale_range's maximum must be positive")
        _check_probability(self.min_product_fraction, "min_product_fraction")
        _check_probability(self.flip_probability, "flip_probability")
        if self.pad_mode not in _PAD_MODES:
            raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {self.pad_mode!r}")


def _origin(lo_edge: int, hi_edge: int, side: int, size: int, rng: np.random.Generator) -> int:
    """A random crop origin along one axis such that [origin, origin + side) contains
    [lo_edge, hi_edge) and overlaps the image [0, size) as much as possible (padding only when
    side > size)."""
    low = max(hi_edge - side, min(0, size - side))
    high = min(lo_edge, max(0, size - side))
    return int(rng.integers(low, high + 1))


def sample_crop(mask: np.ndarray, rng: np.random.Generator, cfg: CropConfig) -> tuple[int, int, int]:
    """(top, left, side) of the square crop `crop_resize` takes (it calls this first, with the same
    rng). The crop contains the whole product bbox; top/left are negative, or top + side > H /
    left + side > W, only when the product is larger than the image's shorter side."""
    keep = binary_mask(mask)
    height, width = keep.shape
    short = min(height, width)
    box = _bbox(keep)
    scale_lo = max(1, math.ceil(cfg.scale_range[0] * short))
    scale_hi = max(1, math.floor(cfg.scale_range[1] * short))
    if box is None:
        y0 = y1 = x0 = x1 = None
        lo, hi = scale_lo, max(scale_lo, scale_hi)
    else:
        y0, y1, x0, x1 = box
        extent = max(y1 - y0, x1 - x0)
        lo = max(extent, scale_lo)
        hi = scale_hi
        if cfg.min_product_fraction > 0:
            hi = min(hi, math.floor(extent / cfg.min_product_fraction))
        hi = max(lo, hi)
        if lo > short:  # larger than any in-image square: the smallest square containing it
            lo = hi = extent
        else:
            hi = min(hi, short)
    side = int(rng.integers(lo, hi + 1))
    if box is None:
        return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side
    return _origin(y0, y1, side, height, rng), _origin(x0, x1, side, width, rng), side


def _take(array: np.ndarray, top: int, left: int, side: int, mode: str, **kwargs) -> np.ndarray:
    """array[top:top + side, left:left + side], padding where the window leaves the array."""
    height, width = array.shape[:2]
    pads = [(max(0, -top), max(0, top + side - height)), (max(0, -left), max(0, left + side - width))]
    window = array[max(0, top):top + side, max(0, left):left + side]
    if any(p for pair in pads for p in pair):
        pads += [(0, 0)] * (array.ndim - 2)
        window = np.pad(window, pads, mode=mode, **kwargs)
    return window


def crop_resize(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: CropConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Random square crop keeping the whole product, resized to cfg.resolution, random h-flip.

    Returns ((R, R, 3) uint8 image, (R, R) uint8 0/255 mask). The image is resized with PIL's
    bilinear filter (antialiased when shrinking; bicubic measured 2.7x slower in the loader), the
    mask by area averaging thresholded at one half (so it stays binary; a product that would
    vanish keeps every partly covered pixel).
    """
    image = _check_image(image)
    keep = binary_mask(mask)
    _check_pair(image, keep)
    top, left, side = sample_crop(keep, rng, cfg)
    size = (cfg.resolution, cfg.resolution)
    h, w = keep.shape
    mask255 = keep.astype(np.uint8) * np.uint8(255)
    if top >= 0 and left >= 0 and top + side <= h and left + side <= w:
        # Inside the image: PIL resamples straight from the crop box, no copy of the crop.
        box = (left, top, left + side, top + side)
        out = np.asarray(Image.fromarray(image, "RGB").resize(size, Image.Resampling.BILINEAR, box=box))
        area = np.asarray(Image.fromarray(mask255, "L").resize(size, Image.Resampling.BOX, box=box))
        crop_mask = keep[top:top + side, left:left + side]
    else:
        crop = np.ascontiguousarray(_take(image, top, left, side, cfg.pad_mode))
        out = np.asarray(Image.fromarray(crop, "RGB").resize(size, Image.Resampling.BILINEAR))
        crop_mask = np.ascontiguousarray(_take(mask255, top, left, side, "constant", constant_values=0))
        area = np.asarray(Image.fromarray(crop_mask, "L").resize(size, Image.Resampling.BOX))
    out_mask = area >= 128
    if not out_mask.any() and crop_mask.any():
        out_mask = area > 0
    out_mask = out_mask.astype(np.uint8) * np.uint8(255)
    if rng.random() < cfg.flip_probability:
        out, out_mask = out[:, ::-1], out_mask[:, ::-1]
    return np.ascontiguousarray(out), np.ascontiguousarray(out_mask)


# ----------------------------------------------------------------------------------------------
# PG self-supervision


@dataclass(frozen=True)
class PGAugmentConfig:
    """Perturbations of PG's self-supervised reference (docs/method.md).

    Pixel sizes are given at `reference_resolution` and scaled by min(H, W) / reference_resolution;
    fractions are of the image's shorter side unless said otherwise.

    dilation_px: (k_min, k_max); k ~ U{k_min..k_max} px; M is dilated by a (2k+1)^2 square.
    rect_probability / rect_count: probability that random rectangles are added to the dilated
        mask, and (min, max) how many.
    blob_probability / blob_count: the same for random (rotated) ellipse blobs.
    shape_size: (min, max) side / diameter of those rectangles and blobs (each axis drawn
        independently). Their centres lie in the dilated mask's bounding box, so they change the
        hole's silhouette (anywhere in the image when the mask is empty).
    max_shift: delta; the shift is uniform in [-max_shift * H, max_shift * H] rows and
        [-max_shift * W, max_shift * W] columns (integers), applied to mask and image alike,
        with zero fill.
    mix_probability / mix_count / mix_size: probability of mixing another image into regions B,
        (min, max) how many regions, and (min, max) their side / diameter.
    mix_ellipse_probability: probability that a mixed region is an ellipse (else a rectangle).
    """

    dilation_px: tuple[int, int] = (5, 25)
    reference_resolution: int = 512
    rect_probability: float = 0.5
    rect_count: tuple[int, int] = (1, 3)
    blob_probability: float = 0.5
    blob_count: tuple[int, int] = (1, 3)
    shape_size: tuple[float, float] = (0.05, 0.25)
    max_shift: float = 0.1
    mix_probability: float = 0.5
    mix_count: tuple[int, int] = (1, 3)
    mix_size: tuple[float, float] = (0.1, 0.4)
    mix_ellipse_probability: float = 0.5

    def __post_init__(self) -> None:
        _check_range(self.dilation_px, "dilation_px")
        if self.reference_resolution < 1:
            raise ValueError(f"reference_resolution must be positive, got {self.reference_resolution}")
        for name in ("rect_probability", "blob_probability", "mix_probability", "mix_ellipse_probability"):
            _check_probability(getattr(self, name), name)
        for name in ("rect_count", "blob_count", "mix_count"):
            _check_range(getattr(self, name), name)
        _check_range(self.shape_size, "shape_size", 0.0, 1.0)
        _check_range(self.mix_size, "mix_size", 0.0, 1.0)
        if not 0.0 <= self.max_shift < 1.0:
            raise ValueError(f"max_shift must lie in [0, 1), got {self.max_shift}")


def _max_filter_1d(mask: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Running OR over a window of 2k+1 along `axis` (O(1) per pixel whatever k: a windowed sum)."""
    n = mask.shape[axis]
    pad = [(0, 0)] * mask.ndim
    pad[axis] = (k + 1, k)
    csum = np.cumsum(np.pad(mask, pad).astype(np.int32), axis=axis)
    hi = [slice(None)] * mask.ndim
    lo = [slice(None)] * mask.ndim
    hi[axis], lo[axis] = slice(2 * k + 1, 2 * k + 1 + n), slice(0, n)
    return csum[tuple(hi)] > csum[tuple(lo)]


def dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Dilation by a (2k+1) x (2k+1) square (Chebyshev distance <= k), separable; (H, W) bool.

    Only the product's bounding box grown by k is filtered: the rest stays empty.
    """
    keep = binary_mask(mask)
    if k < 0:
        raise ValueError(f"dilation radius must be non-negative, got {k}")
    if k == 0 or not keep.any():
        return keep.copy()
    rows, cols = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))
    y0, y1 = max(rows[0] - k, 0), min(rows[-1] + k + 1, keep.shape[0])
    x0, x1 = max(cols[0] - k, 0), min(cols[-1] + k + 1, keep.shape[1])
    out = np.zeros_like(keep)
    out[y0:y1, x0:x1] = _max_filter_1d(_max_filter_1d(keep[y0:y1, x0:x1], k, 0), k, 1)
    return out


def translate(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift an (H, W, ...) array by dy rows (down) and dx columns (right); vacated pixels are 0."""
    array = np.asarray(array)
    out = np.zeros_like(array)
    height, width = array.shape[:2]
    if abs(dy) >= height or abs(dx) >= width:
        return out
    src_y, dst_y = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
    out[dst_y, dst_x] = array[src_y, src_x]
    return out


def _rectangle(shape: tuple[int, int], cy: float, cx: float, h: float, w: float) -> np.ndarray:
    out = np.zeros(shape, bool)
    y0, y1 = max(0, round(cy - h / 2)), min(shape[0], round(cy + h / 2))
    x0, x1 = max(0, round(cx - w / 2)), min(shape[1], round(cx + w / 2))
    out[y0:max(y0, y1), x0:max(x0, x1)] = True
    return out


def _ellipse(shape: tuple[int, int], cy: float, cx: float, h: float, w: float, angle: float) -> np.ndarray:
    out = np.zeros(shape, bool)
    a, b = max(w / 2, 0.5), max(h / 2, 0.5)  # semi-axes along the rotated x and y
    reach = max(a, b)
    y0, y1 = max(0, math.floor(cy - reach)), min(shape[0], math.ceil(cy + reach) + 1)
    x0, x1 = max(0, math.floor(cx - reach)), min(shape[1], math.ceil(cx + reach) + 1)
    if y0 >= y1 or x0 >= x1:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    yy, xx = yy + 0.5 - cy, xx + 0.5 - cx
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = xx * cos + yy * sin, -xx * sin + yy * cos
    out[y0:y1, x0:x1] = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return out


def random_shapes(
    shape: tuple[int, int],
    count: int,
    size: tuple[float, float],
    ellipse_probability: float,
    rng: np.random.Generator,
    within: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Union of `count` random rectangles / rotated ellipses, (H, W) bool.

    size: (min, max) side / diameter as fractions of min(H, W), each axis drawn independently.
    within: (y0, y1, x0, x1) box the centres are drawn from (default: the whole image).
    """
    height, width = shape
    y0, y1, x0, x1 = within if within is not None else (0, height, 0, width)
    short = min(height, width)
    out = np.zeros(shape, bool)
    for _ in range(count):
        cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
        h, w = rng.uniform(size[0], size[1], 2) * short
        if rng.random() < ellipse_probability:
            out |= _ellipse(shape, cy, cx, h, w, rng.uniform(0.0, math.pi))
        else:
            out |= _rectangle(shape, cy, cx, h, w)
    return out


def _count(rng: np.random.Generator, probability: float, count: tuple[int, int]) -> int:
    """How many shapes: 0 unless a `probability` draw succeeds, then U{count[0]..count[1]}."""
    hit = rng.random() < probability
    n = int(rng.integers(count[0], count[1] + 1))
    return n if hit else 0


def random_mask(mask: np.ndarray, rng: np.random.Generator, cfg: PGAugmentConfig) -> np.ndarray:
    """randmask: the mask united with random rectangles and ellipse blobs centred in its bbox."""
    keep = binary_mask(mask)
    within = _bbox(keep)
    n_rect = _count(rng, cfg.rect_probability, cfg.rect_count)
    n_blob = _count(rng, cfg.blob_probability, cfg.blob_count)
    rects = random_shapes(keep.shape, n_rect, cfg.shape_size, 0.0, rng, within)
    blobs = random_shapes(keep.shape, n_blob, cfg.shape_size, 1.0, rng, within)
    return keep | rects | blobs


def mix_regions(
    image: np.ndarray, other_image: np.ndarray | None, rng: np.random.Generator, cfg: PGAugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(I~, B): I~ = I (1 - B) + I_rand B for random rectangular / elliptic regions B, uint8 and
    (H, W) bool. B is empty when the mix draw fails or there is no other image."""
    image = _check_image(image)
    n = _count(rng, cfg.mix_probability, cfg.mix_count)
    regions = random_shapes(image.shape[:2], n, cfg.mix_size, cfg.mix_ellipse_probability, rng)
    if other_image is None or not regions.any():
        return image.copy(), np.zeros(image.shape[:2], bool)
    other_image = _check_image(other_image, "other_image")
    if other_image.shape != image.shape:
        raise ValueError(f"other_image is {other_image.shape} but image is {image.shape}")
    return np.where(regions[..., None], other_image, image), regions


def _scaled_dilation(cfg: PGAugmentConfig, shape: tuple[int, int], rng: np.random.Generator) -> int:
    scale = min(shape) / cfg.reference_resolution
    lo, hi = round(cfg.dilation_px[0] * scale), round(cfg.dilation_px[1] * scale)
    return int(rng.integers(lo, max(lo, hi) + 1))


def pg_perturb(
    image: np.ndarray,
    mask: np.ndarray,
    other_image: np.ndarray | None,
    rng: np.random.Generator,
    cfg: PGAugmentConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The perturbation in uint8: (translate(I~, delta) uint8, blank, M').

    `blank` (H, W) bool marks the pixels c_pg zeroes: M' and whatever the shift vacated;
    c_pg = to_float(shifted) * (1 - blank). Kept in uint8 for the loader, a quarter of the
    bytes of float32 and no float passes over the image.
    """
    image = _check_image(image)
    keep = binary_mask(mask)
    _check_pair(image, keep)
    height, width = keep.shape
    # k and delta are drawn first: for one seed they do not depend on the shape and mix settings
    k = _scaled_dilation(cfg, keep.shape, rng)
    max_dy, max_dx = round(cfg.max_shift * height), round(cfg.max_shift * width)
    dy, dx = int(rng.integers(-max_dy, max_dy + 1)), int(rng.integers(-max_dx, max_dx + 1))
    perturbed = translate(random_mask(dilate(keep, k), rng, cfg), dy, dx)
    mixed, _ = mix_regions(image, other_image, rng, cfg)
    vacated = ~translate(np.ones(keep.shape, bool), dy, dx)
    return translate(mixed, dy, dx), perturbed | vacated, perturbed


def pg_augment(
    image: np.ndarray,
    mask: np.ndarray,
    other_image: np.ndarray | None,
    rng: np.random.Generator,
    cfg: PGAugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """PG's perturbed condition from the target itself: (c_pg, M').

    M' = translate(randmask(dilate(M, k)), delta), I~ = I (1 - B) + I_rand B and
    c_pg = translate(to_float(I~), delta) * (1 - M'). Returns c_pg as (H, W, 3) float32 in [-1, 1],
    exactly 0.0 where M' is 1 and where the shift vacated pixels, and M' as (H, W) float32 {0, 1}.
    `other_image` (I_rand, same shape as `image`) may be None: no mixing.
    """
    shifted, blank, perturbed = pg_perturb(image, mask, other_image, rng, cfg)
    c_pg = np.where(blank[..., None], np.float32(0.0), to_float(shifted))
    return c_pg.astype(np.float32, copy=False), perturbed.astype(np.float32)
