"""Loading product photos and masks: normalise what has one meaning, reject the rest with a reason."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 64 * 1024 * 1024  # anything larger is treated as a decompression bomb


class Rejected(ValueError):
    """An input that cannot become a record; the message is the reason written to the manifest."""


def _open(path: Path | bytes | Image.Image, what: str) -> Image.Image:
    if isinstance(path, Image.Image):  # already decoded (the generation pipeline takes PIL images)
        return path
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
            img.load()  # decode fully now: a truncated file fails here, not in a training worker
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"{what}: decompression bomb refused ({e})") from None
    except FileNotFoundError:
        raise Rejected(f"{what}: file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected(f"{what}: unreadable or truncated image ({e})") from None
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greyscale -> 8-bit by scaling the full range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def load_image(source: Path | bytes | Image.Image, what: str = "image") -> tuple[np.ndarray, Image.Image]:
    """(H, W, 3) uint8 RGB, upright per EXIF; CMYK, palette, greyscale and 16-bit are converted.

    Also returns the upright PIL image (alpha kept) for callers that want the cut-out's alpha.
    """
    img = _open(source, what)
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise Rejected(f"{what}: unreadable EXIF orientation ({e})") from None
    img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        # A photo with an alpha channel: composite on white (the cut-out convention for products).
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), img
    if img.mode not in ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        raise Rejected(f"{what}: unsupported pixel mode {img.mode}")
    return np.asarray(img.convert("RGB")), img


def load_mask(source: Path | bytes | Image.Image, image_shape: tuple[int, int], what: str = "mask",
              threshold: int = 127) -> np.ndarray:
    """A product mask (H, W) uint8 in {0, 255}: the alpha of an RGBA cut-out, or a greyscale mask,
    thresholded (product where the value is above `threshold`).

    Rejects masks without alpha that are colour images (their meaning is not clear), masks of
    another size than the image, empty masks and masks covering the whole image.
    """
    img = _open(source, what)
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"))
    elif img.mode in ("L", "1", "I;16", "I;16B", "I;16L", "I"):
        alpha = np.asarray(_to_8bit(img).convert("L"))
    else:
        raise Rejected(f"{what}: {img.mode} mask without an alpha channel (expected an RGBA cut-out or a "
                       f"greyscale mask)")
    if alpha.shape != tuple(image_shape):
        raise Rejected(f"{what}: size {alpha.shape[::-1]} differs from the image's {tuple(image_shape)[::-1]} (W, H)")
    mask = np.where(alpha > threshold, 255, 0).astype(np.uint8)
    if not mask.any():
        raise Rejected(f"{what}: no product pixels")
    if mask.all():
        raise Rejected(f"{what}: covers the whole image, leaving no background")
    return mask


def encode_png(array: np.ndarray) -> bytes:
    """Lossless; zlib level 1 decodes 1.5x faster in the loader than the default 6 (a 665 px mask:
    0.7 vs 1.06 ms) for files about twice as large, still small next to a photo's JPEG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))
