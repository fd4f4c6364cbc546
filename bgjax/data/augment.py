"""Training augmentations, numpy on the host (they run inside data-loader workers).

Every function is deterministic given a `np.random.Generator`; every probability and range is a
field of a frozen config (`CropConfig`, `PGAugmentConfig`).

- `crop_resize`: a random square crop with scale jitter that keeps the whole product bounding box,
  resized to the training resolution, plus a random horizontal flip of image and mask together;
  `crop_encoded` also says where the crop came from (SDXL's size and crop conditioning, `Crop`).
- PG's self-supervised condition (docs/method.md, "PG self-supervision and the copy shortcut"):

      M'   = translate(randmask(dilate(M, k)), delta)
      I~   = I (1 - B) + I_rand B
      c_pg = translate(I~, delta) * (1 - M')        (I~ in [-1, 1]; masked pixels are 0.0 there)

  so PG sees a perturbed background whose product hole neither has the product's silhouette nor
  sits where the product is, and cannot learn to paste its input back. The loader only draws the
  random parameters (`draw_pg_params`, small fixed-size arrays); the pixels are rendered on the
  accelerator by `bgjax.data.pg_render.pg_condition`, bit-identical to the numpy reference
  `render_pg` here (`pg_augment` = draw + numpy render).

Image convention: (H, W, 3) uint8 RGB. Mask convention: (H, W) uint8 0/255 (bool, 0/1 integers and
floats in [0, 1] are accepted too; see `binary_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "Crop",
    "CropConfig",
    "PGAugmentConfig",
    "binary_mask",
    "crop_resize",
    "crop_encoded",
    "crop_resize_encoded",
    "dilate",
    "draw_pg_batch",
    "draw_pg_params",
    "fill_spans",
    "pg_augment",
    "render_pg",
    "sample_crop",
    "to_float",
    "translate",
]

_PAD_MODES = ("edge", "reflect", "symmetric")
# The loader parallelises over images (grain workers); OpenCV's own threads would only contend with them.
cv2.setNumThreads(1)


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
    """(y0, y1, x0, x1) with exclusive ends of a bool or uint8 mask's nonzero pixels, or None if empty."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    return (y, y + h, x, x + w) if w else None


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
    jpeg_draft: when a JPEG crop is at least twice the resolution, decode it at 1/2, 1/4 or 1/8
        scale in the DCT (libjpeg's scaled decoding: 1.5x to 2.3x less decoding time measured on
        a 3000 px photo), never below the resolution; the result differs from a full decode +
        resize by resampling noise only (tests/test_augment.py states the tolerance). False:
        always decode fully.
    """

    resolution: int = 512
    scale_range: tuple[float, float] = (0.5, 1.0)
    min_product_fraction: float = 0.5
    flip_probability: float = 0.5
    pad_mode: str = "edge"
    jpeg_draft: bool = True

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


def _crop_square(
    height: int, width: int, box: tuple[int, int, int, int] | None, rng: np.random.Generator, cfg: CropConfig
) -> tuple[int, int, int]:
    """`sample_crop` from the image size and the product's bbox (y0, y1, x0, x1), None if empty."""
    short = min(height, width)
    scale_lo = max(1, math.ceil(cfg.scale_range[0] * short))
    scale_hi = max(1, math.floor(cfg.scale_range[1] * short))
    if box is None:
        side = int(rng.integers(scale_lo, max(scale_lo, scale_hi) + 1))
        return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side
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
    return _origin(y0, y1, side, height, rng), _origin(x0, x1, side, width, rng), side


def sample_crop(mask: np.ndarray, rng: np.random.Generator, cfg: CropConfig) -> tuple[int, int, int]:
    """(top, left, side) of the square crop `crop_resize` takes (it calls this first, with the same
    rng). The crop contains the whole product bbox; top/left are negative, or top + side > H /
    left + side > W, only when the product is larger than the image's shorter side."""
    keep = binary_mask(mask)
    return _crop_square(*keep.shape, _bbox(keep), rng, cfg)


# OpenCV's border modes for CropConfig.pad_mode (numpy's names)
_BORDERS = {"edge": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101, "symmetric": cv2.BORDER_REFLECT}
# imdecode's scaled-decoding bits (without IMREAD_COLOR, which means BGR and excludes IMREAD_COLOR_RGB)
_REDUCED = {s: getattr(cv2, f"IMREAD_REDUCED_COLOR_{s}", cv2.IMREAD_COLOR) & ~cv2.IMREAD_COLOR for s in (1, 2, 4, 8)}


def _window(array: np.ndarray, y0: int, y1: int, x0: int, x1: int, border: int) -> np.ndarray:
    """array[y0:y1, x0:x1], padded with `border` where the window leaves the array."""
    height, width = array.shape[:2]
    inner = array[max(0, y0):min(y1, height), max(0, x0):min(x1, width)]
    pads = (max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width))
    return cv2.copyMakeBorder(inner, *pads, border, value=0) if any(pads) else inner


def _area_downscale(array: np.ndarray, scale: int) -> np.ndarray:
    """Mean of each scale x scale block, ceil(H / scale) x ceil(W / scale): an exact integer-factor
    area resize (the array padded to a multiple of the factor: OpenCV's fast path)."""
    height, width = array.shape[:2]
    padded = cv2.copyMakeBorder(array, 0, -height % scale, 0, -width % scale, cv2.BORDER_REPLICATE)
    return cv2.resize(padded, (padded.shape[1] // scale, padded.shape[0] // scale), interpolation=cv2.INTER_AREA)


def _reduction(side: int, resolution: int) -> int:
    """The largest s in 1, 2, 4, 8 with side / s >= resolution: a crop of `side` is first reduced by s."""
    scale = 1
    while scale < 8 and side // (2 * scale) >= resolution:
        scale *= 2
    return scale


@dataclass(frozen=True)
class Crop:
    """A training crop and where it came from, as SDXL conditions on it (its time ids, with the target size
    (resolution, resolution)): the source's size, and the crop's top-left corner in the source scaled as the
    crop is (by resolution / side, SDXL's crop coordinates after its resize), measured from the right edge
    when the crop is flipped (the left offset of the flipped picture); 0 where the crop pads the source."""

    image: np.ndarray  # (R, R, 3) uint8
    mask: np.ndarray  # (R, R) uint8 0/255
    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left)


def _crop_resize(mask: np.ndarray, load_image: Callable[[int], np.ndarray], rng: np.random.Generator,
                 cfg: CropConfig) -> Crop:
    """`crop_resize` from a uint8 0/255 mask and `load_image(s)`: the image, at full size or already
    reduced to 1/s (ceil(H / s) x ceil(W / s), a JPEG decoded at that scale).

    A crop at least twice the resolution is first reduced by s in 2, 4, 8 (area means of s x s
    blocks, or libjpeg's DCT scaling), so the bilinear resize that follows shrinks by less than 2x
    and reads every pixel. Image and mask are cropped on the same pixel grid, the crop's edges
    rounded outwards to it, and resized by the same map, so they stay aligned."""
    height, width = mask.shape
    box = _bbox(mask)
    top, left, side = _crop_square(height, width, box, rng, cfg)
    scale = _reduction(side, cfg.resolution)
    image, coverage = load_image(scale), mask
    if scale > 1:
        coverage = _area_downscale(mask, scale)
        image = _area_downscale(image, scale) if image.shape[:2] == mask.shape else image
    y0, x0 = top // scale, left // scale
    y1, x1 = -(-(top + side) // scale), -(-(left + side) // scale)
    size = (cfg.resolution, cfg.resolution)
    out = cv2.resize(_window(image, y0, y1, x0, x1, _BORDERS[cfg.pad_mode]), size, interpolation=cv2.INTER_LINEAR)
    area = cv2.resize(_window(coverage, y0, y1, x0, x1, cv2.BORDER_CONSTANT), size, interpolation=cv2.INTER_LINEAR)
    out_mask = cv2.threshold(area, 127, 255, cv2.THRESH_BINARY)[1]
    if box is not None and not cv2.countNonZero(out_mask):  # a product under half a pixel keeps every touched one
        out_mask = cv2.threshold(area, 0, 255, cv2.THRESH_BINARY)[1]
    zoom = cfg.resolution / side
    crop_left = round(left * zoom)
    flipped = rng.random() < cfg.flip_probability
    if flipped:
        out, out_mask = cv2.flip(out, 1), cv2.flip(out_mask, 1)
        crop_left = round(width * zoom) - crop_left - cfg.resolution
    return Crop(out, out_mask, (height, width), (max(0, round(top * zoom)), max(0, crop_left)))


def crop_resize(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: CropConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Random square crop keeping the whole product, resized to cfg.resolution, random h-flip.

    Returns ((R, R, 3) uint8 image, (R, R) uint8 0/255 mask). A crop at least twice the resolution
    is first reduced by an integer factor (block means), then image and mask are resized bilinearly
    (OpenCV: 3x to 4x faster than PIL's antialiased filter), shrinking by less than 2x, so every
    pixel counts. The mask's resize is thresholded at one half, so it stays binary, and a product
    that would vanish keeps every pixel it touches.
    """
    image = _check_image(image)
    keep = binary_mask(mask)
    _check_pair(image, keep)
    crop = _crop_resize(keep.view(np.uint8) * np.uint8(255), lambda _: image, rng, cfg)
    return crop.image, crop.mask


def crop_resize_encoded(
    image: bytes, mask: bytes, rng: np.random.Generator, cfg: CropConfig
) -> tuple[np.ndarray, np.ndarray]:
    """`crop_resize` from encoded bytes (JPEG / PNG image, greyscale mask image: > 127 is product).

    A JPEG decodes at a reduced DCT scale when the crop allows (`CropConfig.jpeg_draft`)."""
    crop = crop_encoded(image, mask, rng, cfg)
    return crop.image, crop.mask


def crop_encoded(image: bytes, mask: bytes, rng: np.random.Generator, cfg: CropConfig) -> Crop:
    """`crop_resize_encoded`, and where the crop came from (`Crop`)."""
    # records hold upright pixels (the converters apply EXIF orientation): decode them as stored, like PIL
    coverage = cv2.imdecode(np.frombuffer(mask, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if coverage is None:
        raise ValueError("mask: not a decodable image")
    coverage = cv2.threshold(coverage, 127, 255, cv2.THRESH_BINARY)[1]
    encoded = np.frombuffer(image, np.uint8)
    draft = cfg.jpeg_draft and image[:2] == b"\xff\xd8"

    def load(scale: int) -> np.ndarray:
        scale = scale if draft else 1
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION | _REDUCED[scale])
        if decoded is None:
            raise ValueError("image: not a decodable image")
        if decoded.shape[:2] != tuple(-(-n // scale) for n in coverage.shape):
            raise ValueError(f"mask is {coverage.shape} but its image is {decoded.shape[:2]} (H, W) at 1/{scale}")
        return decoded

    return _crop_resize(coverage, load, rng, cfg)


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
    prompt_swap_probability: probability that the example's prompt names another category than its
        image's (drawn uniformly from the others): the reference must then carry the background's
        style against the prompt, as a shop's ad of another product does at inference.
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
    prompt_swap_probability: float = 0.0

    def __post_init__(self) -> None:
        _check_range(self.dilation_px, "dilation_px")
        if self.reference_resolution < 1:
            raise ValueError(f"reference_resolution must be positive, got {self.reference_resolution}")
        for name in ("rect_probability", "blob_probability", "mix_probability", "mix_ellipse_probability",
                     "prompt_swap_probability"):
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


def _rectangle_spans(shape: tuple[int, int], cy: float, cx: float, h: float, w: float) -> np.ndarray:
    """(H, 2) [lo, hi) column span per row of an axis-aligned rectangle; rows it misses are (0, 0)."""
    height, width = shape
    spans = np.zeros((height, 2), np.int32)
    y0, y1 = max(0, round(cy - h / 2)), min(height, round(cy + h / 2))
    x0, x1 = max(0, round(cx - w / 2)), min(width, round(cx + w / 2))
    if x1 > x0:
        spans[y0:max(y0, y1)] = (x0, x1)
    return spans


def _ellipse_spans(shape: tuple[int, int], cy: float, cx: float, h: float, w: float, angle: float) -> np.ndarray:
    """(H, 2) [lo, hi) column span per row of an ellipse with diameters w (along its own x axis, at
    `angle` from the image's x axis) and h, centred at (cy, cx): the pixels whose centre lies inside.

    An ellipse cuts each row in one interval, solved here per row in float64 on the host, so that
    renderers only compare integer coordinates (bit-identical on every backend)."""
    height, width = shape
    a, b = max(w / 2, 0.5), max(h / 2, 0.5)  # semi-axes along the rotated x and y
    cos, sin = math.cos(angle), math.sin(angle)
    # Offsets (X, Y) of a pixel centre from (cx, cy) are inside iff qa X^2 + qb X Y + qc Y^2 <= 1,
    # where qa qc - qb^2 / 4 = 1 / (a b)^2: per row, X lies within half_width of -qb Y / (2 qa).
    qa = (cos / a) ** 2 + (sin / b) ** 2
    qb = 2 * cos * sin * (1 / a**2 - 1 / b**2)
    offset_y = np.arange(height) + 0.5 - cy
    reach = qa - (offset_y / (a * b)) ** 2
    half_width = np.sqrt(np.maximum(reach, 0.0)) / qa
    middle = cx - 0.5 - qb * offset_y / (2 * qa)  # column (pixel index) of each row's midpoint
    lo = np.clip(np.ceil(middle - half_width), 0, width)
    hi = np.clip(np.floor(middle + half_width) + 1, 0, width)
    empty = (reach < 0) | (hi <= lo)
    return np.where(empty[:, None], 0, np.stack([lo, hi], axis=1)).astype(np.int32)


def fill_spans(spans: np.ndarray, width: int) -> np.ndarray:
    """(S, H, 2) row spans -> (H, W) bool union of the S shapes."""
    x = np.arange(width)
    return ((x >= spans[..., :1]) & (x < spans[..., 1:])).any(axis=0)


def _shape_spans(
    shape: tuple[int, int],
    count: int,
    slots: int,
    size: tuple[float, float],
    ellipse_probability: float,
    rng: np.random.Generator,
    within: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """(slots, H, 2) spans of `count` random rectangles / rotated ellipses, the unused slots empty
    (a fixed shape per config, so the render compiles once).

    size: (min, max) side / diameter as fractions of min(H, W), each axis drawn independently.
    within: (y0, y1, x0, x1) box the centres are drawn from (default: the whole image).
    """
    height, width = shape
    y0, y1, x0, x1 = within if within is not None else (0, height, 0, width)
    short = min(height, width)
    spans = np.zeros((slots, height, 2), np.int32)
    for i in range(count):
        cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
        h, w = rng.uniform(size[0], size[1], 2) * short
        if rng.random() < ellipse_probability:
            spans[i] = _ellipse_spans(shape, cy, cx, h, w, rng.uniform(0.0, math.pi))
        else:
            spans[i] = _rectangle_spans(shape, cy, cx, h, w)
    return spans


def _count(rng: np.random.Generator, probability: float, count: tuple[int, int]) -> int:
    """How many shapes: 0 unless a `probability` draw succeeds, then U{count[0]..count[1]}."""
    hit = rng.random() < probability
    n = int(rng.integers(count[0], count[1] + 1))
    return n if hit else 0


def _scaled_dilation(cfg: PGAugmentConfig, shape: tuple[int, int], rng: np.random.Generator) -> int:
    scale = min(shape) / cfg.reference_resolution
    lo, hi = round(cfg.dilation_px[0] * scale), round(cfg.dilation_px[1] * scale)
    return int(rng.integers(lo, max(lo, hi) + 1))


def _dilated_bbox(keep: np.ndarray, k: int) -> tuple[int, int, int, int] | None:
    """The bounding box of dilate(keep, k), from keep's own."""
    box = _bbox(keep)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    height, width = keep.shape
    return max(0, y0 - k), min(height, y1 + k), max(0, x0 - k), min(width, x1 + k)


def draw_pg_params(mask: np.ndarray, rng: np.random.Generator, cfg: PGAugmentConfig) -> dict[str, np.ndarray]:
    """The perturbation's random parameters for one (H, W) product mask; both renderers
    (`render_pg` here, `bgjax.data.pg_render` on the accelerator) draw nothing themselves.

        pg_dilation   () int32              k, px
        pg_shift      (2,) int32            (dy, dx), px
        pg_hole_spans (S_hole, H, 2) int32  randmask's rectangles then blobs, S_hole = rect_count[1] + blob_count[1]
        pg_mix_spans  (S_mix, H, 2) int32   the mixed regions B, S_mix = mix_count[1]

    Shapes are row spans ([lo, hi) columns per row, (0, 0) where a shape misses the row or its slot
    is unused). Rectangle and blob centres lie in the bounding box of dilate(M, k).
    """
    keep = binary_mask(mask)
    height, width = shape = keep.shape
    # k and delta are drawn first: for one seed they do not depend on the shape and mix settings
    k = _scaled_dilation(cfg, shape, rng)
    max_dy, max_dx = round(cfg.max_shift * height), round(cfg.max_shift * width)
    dy, dx = int(rng.integers(-max_dy, max_dy + 1)), int(rng.integers(-max_dx, max_dx + 1))
    n_rect = _count(rng, cfg.rect_probability, cfg.rect_count)
    n_blob = _count(rng, cfg.blob_probability, cfg.blob_count)
    within = _dilated_bbox(keep, k)
    holes = np.concatenate([
        _shape_spans(shape, n_rect, cfg.rect_count[1], cfg.shape_size, 0.0, rng, within),
        _shape_spans(shape, n_blob, cfg.blob_count[1], cfg.shape_size, 1.0, rng, within),
    ])
    n_mix = _count(rng, cfg.mix_probability, cfg.mix_count)
    mix = _shape_spans(shape, n_mix, cfg.mix_count[1], cfg.mix_size, cfg.mix_ellipse_probability, rng)
    return {"pg_dilation": np.int32(k), "pg_shift": np.array([dy, dx], np.int32), "pg_hole_spans": holes,
            "pg_mix_spans": mix}


def draw_pg_batch(masks: np.ndarray, rng: np.random.Generator | list[np.random.Generator],
                  cfg: PGAugmentConfig) -> dict[str, np.ndarray]:
    """`draw_pg_params` for each of a batch's (B, H, W) masks, in order, stacked: (B, ...) arrays.
    `rng`: one generator for the whole batch, or a list with one per image."""
    rngs = rng if isinstance(rng, list) else [rng] * len(masks)
    draws = [draw_pg_params(mask, r, cfg) for mask, r in zip(masks, rngs, strict=True)]
    return {key: np.stack([d[key] for d in draws]) for key in draws[0]}


def render_pg(
    image: np.ndarray, mask: np.ndarray, other_image: np.ndarray | None, params: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The numpy reference render of `draw_pg_params`' parameters: (c_pg, M').

    M' = translate(dilate(M, k) | holes, delta), I~ = I (1 - B) + I_rand B and
    c_pg = translate(to_float(I~), delta) * (1 - M'): (H, W, 3) float32 in [-1, 1], +0.0 where M'
    is set and where the shift vacated pixels; M' (H, W) bool. `other_image` (I_rand, the same
    shape as `image`) may be None: no mixing.
    """
    image = _check_image(image)
    keep = binary_mask(mask)
    _check_pair(image, keep)
    width = keep.shape[1]
    hole = dilate(keep, int(params["pg_dilation"])) | fill_spans(params["pg_hole_spans"], width)
    if other_image is not None:
        other_image = _check_image(other_image, "other_image")
        if other_image.shape != image.shape:
            raise ValueError(f"other_image is {other_image.shape} but image is {image.shape}")
        image = np.where(fill_spans(params["pg_mix_spans"], width)[..., None], other_image, image)
    dy, dx = (int(v) for v in params["pg_shift"])
    perturbed = translate(hole, dy, dx)
    blank = perturbed | ~translate(np.ones(keep.shape, bool), dy, dx)
    c_pg = np.where(blank[..., None], np.float32(0.0), to_float(translate(image, dy, dx)))
    return c_pg, perturbed


def pg_augment(
    image: np.ndarray,
    mask: np.ndarray,
    other_image: np.ndarray | None,
    rng: np.random.Generator,
    cfg: PGAugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """PG's perturbed condition from the target itself, drawn and rendered in numpy: (c_pg, M'),
    c_pg as `render_pg` gives it and M' as (H, W) float32 {0, 1}."""
    c_pg, perturbed = render_pg(image, mask, other_image, draw_pg_params(mask, rng, cfg))
    return c_pg, perturbed.astype(np.float32)
