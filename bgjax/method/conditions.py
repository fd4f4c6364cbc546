"""The branches' image conditions, checked: c_cg = I * M and c_pg = I_ref * (1 - M_ref)."""

from __future__ import annotations

import numpy as np


def check_mask(mask: np.ndarray, image: np.ndarray, name: str) -> np.ndarray:
    """A product mask for `image`: (H, W) with values in [0, 1] and at least one product pixel."""
    mask = np.asarray(mask, np.float32)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != np.shape(image)[:2]:
        raise ValueError(f"{name}: mask is {mask.shape[:2]} but its image is {np.shape(image)[:2]} (H, W)")
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"{name}: mask values must lie in [0, 1]")
    if mask.max() < 0.5:
        raise ValueError(f"{name}: mask marks no product pixels")
    return mask


def check_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) image, got shape {image.shape}")
    if not np.isfinite(image).all() or image.min() < -1 or image.max() > 1:
        raise ValueError(f"{name}: pixel values must lie in [-1, 1]")
    return image


def product_condition(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c_cg, M): the product alone on black, and its checked mask."""
    image = check_image(image, "product")
    mask = check_mask(mask, image, "product")
    return image * mask[..., None], mask


def reference_condition(reference: np.ndarray, reference_mask: np.ndarray | None) -> np.ndarray:
    """c_pg: the reference's background with its product blanked out."""
    reference = check_image(reference, "reference")
    if reference_mask is None:
        raise ValueError("reference: a reference image needs its product mask (or give an RGBA cut-out), "
                         "so that its product can be removed")
    mask = check_mask(reference_mask, reference, "reference")
    if mask.min() > 0.5:
        raise ValueError("reference: mask covers the whole image, leaving no background to copy a style from")
    return reference * (1.0 - mask[..., None])
