"""Synthetic ad images: procedural products on backgrounds with a category style and a personal tone.

Used by the tests and to train the bundled demo model. Like the paper's data, a background has
what its category shares and what is particular to the shop:
- the category fixes the hue and the pattern (stripes and their direction, tiles, a vignette, ...), which a
  tiny model can learn and a simple statistic can recognise (`classify_background`);
- each image has its own tone, from dark to pastel, which the prompt does not tell: only a
  reference shows it, so it is what PG learns to carry over (`background_tone` measures it).
Products come in a shape family per category and are drawn without anti-aliasing, so their masks
are exact. Deterministic per (index, seed, size, category, tone).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[str, ...] = ("rice cooker", "desk lamp", "coffee mug", "running shoe", "water bottle",
                               "table fan")
MIN_SIZE = 32
COVERAGE = (0.10, 0.45)  # fraction of the image the product covers, always within this range
_MARGIN = 2  # pixels kept free on every side so the product never touches the border
_CENTROID_SAMPLES, _CENTROID_SEED = 180, 12345
# tone -1 darkens the background to this fraction of its brightness; +1 moves it this far to white
_DARKEN, _LIGHTEN = 0.6, 0.5
# `background_style_features` reads the background blurred by this fraction of the image side (2 px at 64 px):
# the pattern a 4x-downsampling latent carries, not the pixel texture a VAE invents inside its cells
STYLE_BLUR = 1 / 32
# `halo`: the ring just outside the product, and the background further out it is compared with (pixels)
HALO_RING, HALO_REFERENCE = 3, (4, 8)

# Background style per category (same order as CATEGORIES): base colour and pattern kind.
_STYLES: tuple[tuple[tuple[int, int, int], str], ...] = (
    # warm amber in vertical stripes: a top-to-bottom gradient here was drawn darker at the sides by the bundled
    # model and read as the purple vignette or the orange stripes (2 of 16 right); stripes across x are a pattern
    # no other style has, and stripes are what the tiny model draws most faithfully (desk lamp, table fan)
    ((230, 180, 110), "vertical_stripes"),
    ((90, 140, 230), "horizontal_stripes"),  # cool blue
    ((70, 170, 90), "soft_noise"),  # green
    ((170, 90, 200), "radial_vignette"),  # purple
    ((160, 160, 165), "tiles"),  # grey
    ((240, 140, 50), "diagonal_stripes"),  # orange
)

# Product shape family per category, in a unit box (x right, y down): (kind, part, coords, extra).
# part 0 is the textured body, part 1 an accent (lid, cap, sole, base) in a second colour.
_Prim = tuple[str, int, tuple[float, ...], float]
_FAMILIES: tuple[tuple[tuple[float, float], tuple[_Prim, ...]], ...] = (
    ((1.0, 1.3), (  # rice cooker: rounded body, elliptic lid, knob
        ("rrect", 0, (0.0, 0.22, 1.0, 1.0), 0.2),
        ("ellipse", 1, (0.04, 0.06, 0.96, 0.42), 0.0),
        ("rect", 1, (0.42, 0.0, 0.58, 0.12), 0.0))),
    ((0.75, 1.0), (  # desk lamp: base, slanted arm, conical shade
        ("ellipse", 1, (0.05, 0.86, 0.7, 1.0), 0.0),
        ("poly", 1, (0.3, 0.93, 0.44, 0.93, 0.66, 0.3, 0.52, 0.3), 0.0),
        ("poly", 0, (0.42, 0.0, 0.74, 0.0, 1.0, 0.5, 0.22, 0.5), 0.0))),
    ((1.1, 1.35), (  # coffee mug: body and a ring handle
        ("ring", 1, (0.5, 0.18, 1.0, 0.74), 0.1),
        ("rrect", 0, (0.0, 0.0, 0.74, 1.0), 0.08))),
    ((1.7, 2.2), (  # running shoe: upper and sole
        ("poly", 0, (0.02, 0.82, 0.04, 0.35, 0.32, 0.0, 0.55, 0.04, 0.62, 0.42, 1.0, 0.56, 1.0, 0.82), 0.0),
        ("rrect", 1, (0.0, 0.78, 1.0, 1.0), 0.06))),
    ((0.36, 0.46), (  # water bottle: body, shoulders, neck, cap
        ("rrect", 0, (0.0, 0.3, 1.0, 1.0), 0.15),
        ("poly", 0, (0.0, 0.36, 0.25, 0.16, 0.75, 0.16, 1.0, 0.36), 0.0),
        ("rect", 0, (0.25, 0.08, 0.75, 0.2), 0.0),
        ("rect", 1, (0.18, 0.0, 0.82, 0.1), 0.0))),
    ((0.8, 0.95), (  # table fan: round head, hub, stem, base
        ("ellipse", 0, (0.0, 0.0, 1.0, 0.74), 0.0),
        ("ellipse", 1, (0.42, 0.29, 0.58, 0.45), 0.0),
        ("rect", 1, (0.44, 0.7, 0.56, 0.9), 0.0),
        ("rrect", 1, (0.14, 0.87, 0.86, 1.0), 0.05))),
)


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    id: str
    category: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8 in {0, 255}
    background: np.ndarray  # (H, W, 3) uint8, before the product was placed


def _background(style: int, size: int, tone: float, rng: np.random.Generator) -> np.ndarray:
    base_rgb, kind = _STYLES[style]
    base = np.asarray(base_rgb, np.float64) + rng.uniform(-12, 12, 3)
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size
    jitter, phase = rng.uniform(0.85, 1.15), rng.uniform(0, 1)

    def stripes(position: np.ndarray, cycles: int) -> np.ndarray:  # hard-edged bands across `position`
        return 0.78 + 0.22 * np.sign(np.sin(2 * np.pi * (position * cycles * jitter + phase)))

    if kind == "vertical_stripes":
        shade = stripes(xx, 5)
    elif kind == "horizontal_stripes":
        shade = stripes(yy, 8)
    elif kind == "soft_noise":
        grid = int(rng.integers(6, 11))
        noise = Image.fromarray(rng.integers(0, 256, (grid, grid), dtype=np.uint8))
        shade = 0.7 + 0.3 * np.asarray(noise.resize((size, size), Image.Resampling.BICUBIC)) / 255.0
    elif kind == "radial_vignette":
        shade = 1.0 - 0.9 * jitter * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2)
    elif kind == "tiles":
        n = 6 * jitter
        shade = 0.8 + 0.2 * ((np.floor(yy * n + phase) + np.floor(xx * n + phase)) % 2)
    else:  # diagonal stripes
        shade = stripes(xx + yy, 5)
    colour = base * shade[..., None]
    colour = colour * (1 + _DARKEN * tone) if tone < 0 else colour + (255 - colour) * _LIGHTEN * tone
    return np.clip(colour, 0, 255).astype(np.uint8)


def _draw_parts(family: int, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Part labels (0 outside, 1 body, 2 accent) of a family's shape drawn into `box` (inclusive pixels)."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    labels = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(labels)  # "L" images are drawn without anti-aliasing: the mask is exact

    def pt(x: float, y: float) -> tuple[int, int]:
        return left + round(x * w), top + round(y * h)

    for kind, part, c, extra in _FAMILIES[family][1]:
        fill = part + 1
        if kind == "poly":
            draw.polygon([pt(c[i], c[i + 1]) for i in range(0, len(c), 2)], fill=fill)
            continue
        xy = (*pt(c[0], c[1]), *pt(c[2], c[3]))
        if kind == "rect":
            draw.rectangle(xy, fill=fill)
        elif kind == "rrect":
            draw.rounded_rectangle(xy, radius=max(1, round(extra * min(w, h))), fill=fill)
        elif kind == "ellipse":
            draw.ellipse(xy, fill=fill)
        else:  # ring
            draw.ellipse(xy, outline=fill, width=max(2, round(extra * w)))
    return np.asarray(labels)


def _place(family: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Part labels of one product at a random scale and position, covering COVERAGE of the image."""
    aspect = rng.uniform(*_FAMILIES[family][0])  # width / height
    target = rng.uniform(COVERAGE[0] + 0.03, COVERAGE[1] - 0.05)
    room = size - 2 * _MARGIN - 1  # largest box extent that keeps the margin
    scale = np.sqrt(target * size * size / (0.6 * aspect))  # box height for a guessed fill ratio of 0.6
    for _ in range(6):  # rescale until the drawn coverage is near the target (the fill ratio varies by family)
        h = int(np.clip(round(scale), 8, room))
        w = int(np.clip(round(scale * aspect), 8, room))
        labels = _draw_parts(family, (0, 0, w, h), size)
        cover = float((labels > 0).mean())
        if COVERAGE[0] <= cover <= COVERAGE[1] and abs(cover - target) < 0.02:
            break
        scale *= np.sqrt(target / max(cover, 1e-3))
    left = int(rng.integers(_MARGIN, size - _MARGIN - w))
    top = int(rng.integers(_MARGIN, size - _MARGIN - h))
    return np.roll(labels, (top, left), axis=(0, 1))


def _product_colours(rng: np.random.Generator, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bg_mean = background.reshape(-1, 3).mean(0)
    for _ in range(64):  # the product must stand out from the background, or the mask is not learnable
        body = rng.uniform(15, 240, 3)
        if np.linalg.norm(body - bg_mean) > 120:
            break
    else:
        body = 255.0 - bg_mean
    accent_kind = int(rng.integers(3))
    if accent_kind == 0:
        accent = body * 0.45
    elif accent_kind == 1:
        accent = body + (255 - body) * 0.6
    else:
        accent = np.full(3, rng.uniform(25, 70))
    return body, accent


def _texture(size: int, box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Multiplicative shading of the body: cylinder-like light across the box times a random pattern."""
    left, top, right, _ = box
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    u = (xx - left) / max(right - left, 1)
    shade = 0.8 + 0.2 * np.cos(np.pi * (u - rng.uniform(0.3, 0.6)))
    period = int(rng.integers(3, max(4, size // 10)))
    kind = int(rng.integers(5))
    if kind == 1:  # bands
        pattern = 0.85 + 0.15 * ((yy // period) % 2)
    elif kind == 2:  # vertical pinstripes
        pattern = 0.85 + 0.15 * ((xx // period) % 2)
    elif kind == 3:  # checks
        pattern = 0.85 + 0.15 * ((yy // period + xx // period) % 2)
    elif kind == 4:  # dots
        pattern = 1.0 - 0.2 * (((yy % (2 * period)) - period) ** 2 + ((xx % (2 * period)) - period) ** 2
                               < (period * 0.6) ** 2)
    else:  # plain
        pattern = np.ones_like(yy)
    return shade * pattern


def make_sample(index: int, seed: int = 0, size: int = 128, category: str | None = None,
                tone: float | None = None) -> SyntheticSample:
    """One ad image; category defaults to CATEGORIES[index % len(CATEGORIES)], the background's
    tone in [-1 (dark), 1 (pastel)] to a uniform draw."""
    category = category or CATEGORIES[index % len(CATEGORIES)]
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; they are: {', '.join(CATEGORIES)}")
    if size < MIN_SIZE:
        raise ValueError(f"synthetic samples need size >= {MIN_SIZE}, got {size}")
    cat = CATEGORIES.index(category)
    rng = np.random.default_rng([seed, index, size, cat])
    drawn = rng.uniform(-1, 1)
    if tone is not None and not -1 <= tone <= 1:
        raise ValueError(f"tone must lie in [-1, 1], got {tone}")
    background = _background(cat, size, drawn if tone is None else tone, rng)
    labels = _place(cat, size, rng)
    ys, xs = np.nonzero(labels)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    body, accent = _product_colours(rng, background)
    texture = _texture(size, box, rng)[..., None]
    product = np.where((labels == 1)[..., None], body * texture, accent * texture[..., :1] ** 0.5)
    mask = np.where(labels > 0, 255, 0).astype(np.uint8)
    image = np.where(mask[..., None] > 0, np.clip(product, 0, 255).astype(np.uint8), background)
    return SyntheticSample(f"synthetic-{seed}-{index:07d}", category, image, mask, background)


def samples(num: int, seed: int = 0, size: int = 128) -> Iterator[SyntheticSample]:
    """make_sample(i, seed, size) for i in range(num): the categories cycle in CATEGORIES order."""
    return (make_sample(i, seed, size) for i in range(num))


def save_rgba_cutout(sample: SyntheticSample) -> Image.Image:
    """The product alone as an RGBA cut-out (alpha = mask, RGB zero outside), the BG60k mask format."""
    rgba = np.dstack([np.where(sample.mask[..., None] > 0, sample.image, 0), sample.mask])
    return Image.fromarray(rgba.astype(np.uint8), "RGBA")


def _background_pixels(image: np.ndarray, mask: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(image, np.float64)[..., :3] / 255.0
    bg = np.asarray(mask) < 128
    if not bg.any():
        raise ValueError(f"{what}: the mask covers the whole image")
    return img, bg


def background_tone(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean brightness (0-1) of the background pixels (mask == 0): what a synthetic tone sets."""
    img, bg = _background_pixels(image, mask, "background_tone")
    return float(img[bg].mean())


def _blur_background(img: np.ndarray, bg: np.ndarray, sigma: float) -> np.ndarray:
    """`img` blurred over its background pixels only (normalised convolution: the product neither
    bleeds in nor darkens the edge); the product's pixels are left as they are."""
    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)

    weight = bg.astype(np.float64)
    covered = blur(weight)[..., None]
    blurred = blur(img * weight[..., None]) / np.maximum(covered, 1e-6)
    return np.where(bg[..., None], blurred, img)


def background_style_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Category style statistics of the background pixels (mask == 0), independent of image size
    and of the tone (brightness is divided out), read after a blur of STYLE_BLUR x the image side:
    texture finer than that (noise, a VAE's blotches) does not change the style.

    [chromaticity R, G, B (mean colour / its sum), log relative gradient energy, vertical-vs-horizontal
    gradient balance, diagonal-vs-antidiagonal balance, relative centre-minus-edge brightness,
    dominant frequency (cycles / image / 10)].
    """
    img, bg = _background_pixels(image, mask, "background_style_features")
    img = _blur_background(img, bg, STYLE_BLUR * np.sqrt(bg.size))
    mean_rgb = img[bg].mean(0)
    grey = img.mean(-1) / max(float(mean_rgb.mean()), 1e-3)
    size = float(np.sqrt(grey.size))

    def energy(a: np.ndarray, b: np.ndarray, ok: np.ndarray) -> float:
        # diffs of smooth styles shrink as 1/size and stripe edges get rarer as 1/size: scale back up
        return float(np.abs(a - b)[ok].mean()) * size if ok.any() else 0.0

    dy = energy(grey[1:], grey[:-1], bg[1:] & bg[:-1])
    dx = energy(grey[:, 1:], grey[:, :-1], bg[:, 1:] & bg[:, :-1])
    dd = energy(grey[1:, 1:], grey[:-1, :-1], bg[1:, 1:] & bg[:-1, :-1])
    da = energy(grey[1:, :-1], grey[:-1, 1:], bg[1:, :-1] & bg[:-1, 1:])
    h, w = grey.shape
    centre = np.zeros_like(bg)
    centre[h // 4: h - h // 4, w // 4: w - w // 4] = True
    inner, outer = bg & centre, bg & ~centre
    contrast = grey[inner].mean() - grey[outer].mean() if inner.any() and outer.any() else 0.0
    filled = np.where(bg, grey - grey[bg].mean(), 0.0)  # product pixels contribute nothing to the spectrum
    spectrum = np.abs(np.fft.fft2(filled))
    spectrum[0, 0] = 0.0
    ky, kx = np.unravel_index(int(np.argmax(spectrum)), spectrum.shape)
    freq = np.hypot(min(ky, h - ky), min(kx, w - kx))
    return np.array([*mean_rgb / max(float(mean_rgb.sum()), 1e-3), np.log(dy + dx + 1e-3),
                     (dy - dx) / (dy + dx + 1e-6), (dd - da) / (dd + da + 1e-6), contrast, freq / 10.0], np.float32)


@functools.lru_cache(maxsize=8)
def _centroids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-category centroids of standardised features, from generated samples of this size (computed once)."""
    feats = np.stack([background_style_features(s.image, s.mask)
                      for s in samples(_CENTROID_SAMPLES, seed=_CENTROID_SEED, size=size)])
    labels = np.arange(_CENTROID_SAMPLES) % len(CATEGORIES)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mean) / std
    return np.stack([z[labels == c].mean(0) for c in range(len(CATEGORIES))]), mean, std


def classify_background(image: np.ndarray, mask: np.ndarray) -> str:
    """The category whose background style is nearest (standardised features, nearest centroid)."""
    # features are size-independent, but centroids from the nearest generated size are a little tighter
    size = int(np.clip(round(min(np.shape(image)[:2]) / 32) * 32, 64, 256))
    cents, mean, std = _centroids(size)
    f = (background_style_features(image, mask) - mean) / std
    return CATEGORIES[int(np.argmin(((cents - f) ** 2).sum(-1)))]


def _near(product: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within Euclidean distance `radius` of a product pixel (the product included)."""
    h, w = product.shape
    padded = np.pad(product, radius)
    near = np.zeros_like(product)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                near |= padded[radius + dy: radius + dy + h, radius + dx: radius + dx + w]
    return near


def _box_sum(a: np.ndarray, radius: int) -> np.ndarray:
    """Sum of `a` (H, W, ...) over the (2 radius + 1)^2 window around each pixel, zero outside the image."""
    c = np.pad(a, [(radius + 1, radius), (radius + 1, radius)] + [(0, 0)] * (a.ndim - 2)).cumsum(0).cumsum(1)
    k = 2 * radius + 1
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def halo(image: np.ndarray, mask: np.ndarray) -> float:
    """How far the colour of the ring just outside the product (background pixels within HALO_RING px of it)
    is from the background a little further out (HALO_REFERENCE px): around each ring pixel, the mean colour
    of the ring and the mean colour of the reference pixels in the window of HALO_REFERENCE[1] px, their mean
    absolute RGB difference (0-1), averaged over the ring. A light or dark rim, or the product's colour bleeding
    out, raises it; the local means average a background pattern out, though not entirely: compare with the
    ground truth's own level, not with 0."""
    img = np.asarray(image, np.float64)[..., :3] / 255.0
    product = np.asarray(mask) >= 128
    if not product.any():
        raise ValueError("halo: the mask is empty (no product)")
    ring = _near(product, HALO_RING) & ~product
    inner, outer = HALO_REFERENCE
    reference = _near(product, outer) & ~_near(product, inner)

    def local_mean(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = _box_sum(region.astype(np.float64), outer)
        return _box_sum(img * region[..., None], outer) / np.maximum(count, 1)[..., None], count

    ring_colour, _ = local_mean(ring)
    reference_colour, count = local_mean(reference)
    use = ring & (count > 0)
    if not use.any():
        raise ValueError("halo: no background around the product to compare its ring with")
    return float(np.abs(ring_colour - reference_colour)[use].mean())
