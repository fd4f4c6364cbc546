"""Background CLIP similarity: cosine similarity of two images' CLIP embeddings with their products masked out.

Masking: every product pixel (mask 1; soft masks blend) is set to CLIP's mean colour,
255 * CLIP_MEAN, before preprocessing, so after CLIP's normalisation the product region
is zero (to within 0.004: the resize rounds to uint8 levels, as transformers' does), the
value an average pixel takes. The product then adds no colour or texture of its own, only
a flat silhouette, which two images with the same product placement share. Each image is
masked by its own mask, so a generated image and a reference with a different product
compare background against background.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bgjax.eval.clip_vision import CLIP_MEAN, CLIPVisionModelWithProjection, preprocess


def mask_products(images: jax.Array, masks: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [0, 255], masks (B, H, W) in [0, 1] (1 = product) -> float images, product = CLIP mean."""
    m = jnp.asarray(masks, jnp.float32)[..., None]
    return images.astype(jnp.float32) * (1 - m) + 255.0 * jnp.asarray(CLIP_MEAN) * m


@partial(jax.jit, static_argnums=0)
def background_embeddings(module: CLIPVisionModelWithProjection, params: dict, images: jax.Array,
                          masks: jax.Array) -> jax.Array:
    """Unit-norm CLIP image embeddings (B, projection_dim) of the images with their products masked out."""
    pixels = preprocess(mask_products(images, masks), module.config.image_size)
    embeds = module.apply({"params": params}, pixels).image_embeds
    return embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)


def _embed_all(module: CLIPVisionModelWithProjection, params: dict, images: np.ndarray, masks: np.ndarray,
               batch_size: int) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch_size):
        x, m = images[i:i + batch_size], masks[i:i + batch_size]
        pad = batch_size - len(x)  # repeat the last image so every call has one shape: one compilation
        if pad:
            x, m = (np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in (x, m))
        out.append(np.asarray(background_embeddings(module, params, jnp.asarray(x), jnp.asarray(m)))[:batch_size - pad])
    return np.concatenate(out)


def background_similarity(module: CLIPVisionModelWithProjection, params: dict, images_a: np.ndarray,
                          masks_a: np.ndarray, images_b: np.ndarray, masks_b: np.ndarray,
                          batch_size: int = 32) -> np.ndarray:
    """Cosine similarity (N,) of pairs (images_a[i], images_b[i]), backgrounds only.

    Images are (N, H, W, 3) uint8 or floats in [0, 255] and masks (N, H, W) in [0, 1];
    the two sets may differ in size (each is resized to CLIP's input on its own).
    """
    images_a, images_b = np.asarray(images_a), np.asarray(images_b)
    masks_a, masks_b = np.asarray(masks_a), np.asarray(masks_b)
    for name, images, masks in (("a", images_a, masks_a), ("b", images_b, masks_b)):
        if images.ndim != 4 or masks.shape != images.shape[:3]:
            raise ValueError(f"images_{name} {images.shape} and masks_{name} {masks.shape}: expected (N, H, W, 3) "
                             f"and (N, H, W)")
    if len(images_a) != len(images_b):
        raise ValueError(f"{len(images_a)} images in a, {len(images_b)} in b: pairs need equal counts")
    ea = _embed_all(module, params, images_a, masks_a, batch_size)
    eb = _embed_all(module, params, images_b, masks_b, batch_size)
    return np.sum(ea * eb, axis=-1)
