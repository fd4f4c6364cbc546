"""Synthetic ad images: procedural products on backgrounds whose style is set by the category.

Used by the tests and to train the bundled demo model. Each category's background has a
style a tiny model can learn and a simple statistic can recognise (colour, gradient
direction, stripes); products are drawn with exact masks. Deterministic per (index, seed).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[str, ...] = ("rice cooker", "desk lamp", "coffee mug", "running shoe", "water bottle",
                               "table fan")


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    id: str
    category: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8 in {0, 255}
    background: np.ndarray  # (H, W, 3) uint8, before the product was placed


def _background(style: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    jitter = rng.uniform(0.9, 1.1)
    if style == 0:  # warm beige, light at the top, darker at the bottom
        base, shade = np.array([235, 215, 180]), 1.0 - 0.45 * yy * jitter
    elif style == 1:  # cool blue horizontal stripes
        base, shade = np.array([90, 140, 230]), 0.75 + 0.25 * np.sign(np.sin(2 * np.pi * yy * 8 * jitter))
    elif style == 2:  # green with soft noise
        noise = np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC)) / 255.0
        base, shade = np.array([70, 170, 90]), 0.7 + 0.3 * noise
    elif style == 3:  # purple with a dark vignette
        base, shade = np.array([170, 90, 200]), 1.0 - 0.9 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) * jitter
    elif style == 4:  # grey tiles
        tiles = (np.floor(yy * 6 * jitter) + np.floor(xx * 6 * jitter)) % 2
        base, shade = np.array([160, 160, 165]), 0.8 + 0.2 * tiles
    else:  # orange diagonal stripes
        base, shade = np.array([240, 140, 50]), 0.75 + 0.25 * np.sign(np.sin(2 * np.pi * (xx + yy) * 5 * jitter))
    return np.clip(base * shade[..., None], 0, 255).astype(np.uint8)


def _product(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A product (full-canvas RGB) and its exact mask, fully inside the frame."""
    w = int(size * rng.uniform(0.3, 0.65))
    h = int(size * rng.uniform(0.35, 0.7))
    left = int(rng.integers(2, size - w - 2))
    top = int(rng.integers(2, size - h - 2))
    box = (left, top, left + w, top + h)
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    shape = int(rng.integers(3))
    if shape == 0:
        draw.rounded_rectangle(box, radius=min(w, h) // 5, fill=255)
    elif shape == 1:
        draw.ellipse(box, fill=255)
    else:  # a cylinder: body and an elliptic lid
        draw.rectangle((left, top + h // 6, left + w, top + h), fill=255)
        draw.ellipse((left, top, left + w, top + h // 3), fill=255)
    mask = np.asarray(mask_img)
    colour = rng.uniform(30, 225, 3)
    yy, xx = np.mgrid[:size, :size]
    pattern = 0.8 + 0.2 * (((yy + xx * rng.integers(0, 2)) // max(2, size // 16)) % 2)
    product = np.clip(colour * pattern[..., None], 0, 255).astype(np.uint8)
    return product, np.where(mask >= 128, 255, 0).astype(np.uint8)


def make_sample(index: int, seed: int = 0, size: int = 128, category: str | None = None) -> SyntheticSample:
    category = category or CATEGORIES[index % len(CATEGORIES)]
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; they are: {', '.join(CATEGORIES)}")
    rng = np.random.default_rng([seed, index, size])
    background = _background(CATEGORIES.index(category), size, rng)
    product, mask = _product(size, rng)
    image = np.where(mask[..., None] > 0, product, background)
    return SyntheticSample(f"synthetic-{seed}-{index:07d}", category, image, mask, background)


def samples(num: int, seed: int = 0, size: int = 128) -> Iterator[SyntheticSample]:
    return (make_sample(i, seed, size) for i in range(num))


def save_rgba_cutout(sample: SyntheticSample) -> Image.Image:
    """The product alone as an RGBA cut-out (alpha = mask), the BG60k mask format."""
    rgba = np.dstack([np.where(sample.mask[..., None] > 0, sample.image, 0), sample.mask])
    return Image.fromarray(rgba.astype(np.uint8), "RGBA")


def background_style_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean colour and directional gradient energies of the background pixels (mask == 0)."""
    img = np.asarray(image, np.float32) / 255.0
    bg = np.asarray(mask) < 128
    grey = img.mean(-1)
    dy = np.abs(np.diff(grey, axis=0))[bg[1:] & bg[:-1]]
    dx = np.abs(np.diff(grey, axis=1))[bg[:, 1:] & bg[:, :-1]]
    dd = np.abs(grey[1:, 1:] - grey[:-1, :-1])[bg[1:, 1:] & bg[:-1, :-1]]
    centre = grey[grey.shape[0] // 3: 2 * grey.shape[0] // 3, grey.shape[1] // 3: 2 * grey.shape[1] // 3]
    centre_bg = bg[grey.shape[0] // 3: 2 * grey.shape[0] // 3, grey.shape[1] // 3: 2 * grey.shape[1] // 3]
    contrast = (centre[centre_bg].mean() if centre_bg.any() else grey[bg].mean()) - grey[bg].mean()
    return np.array([*img[bg].mean(0), dy.mean(), dx.mean(), dd.mean(), contrast], np.float32)


@functools.lru_cache(maxsize=4)
def _centroids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats = np.stack([background_style_features(s.image, s.mask) for s in samples(120, seed=12345, size=size)])
    labels = np.arange(120) % len(CATEGORIES)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    cents = np.stack([((feats - mean) / std)[labels == c].mean(0) for c in range(len(CATEGORIES))])
    return cents, mean, std


def classify_background(image: np.ndarray, mask: np.ndarray) -> str:
    """The category whose background style is nearest (standardised features, nearest centroid)."""
    cents, mean, std = _centroids(int(np.shape(image)[0]))
    f = (background_style_features(image, mask) - mean) / std
    return CATEGORIES[int(np.argmin(((cents - f) ** 2).sum(-1)))]
