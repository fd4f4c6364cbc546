"""The product region that mask-guided cross-attention and PG's output masking need.

`Region` carries the product mask at any resolution and the prompt's foreground and
background token sets; each attention layer area-resizes the mask to its own h x w.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# none: plain cross-attention. mask_guided: CG's y = M_r A_fg + (1 - M_r) A_bg.
# mask_output: PG's y <- (1 - M_r) y on every cross-attention output.
RegionMode = Literal["none", "mask_guided", "mask_output"]
REGION_MODES = ("none", "mask_guided", "mask_output")


@flax.struct.dataclass
class Region:
    product_mask: jax.Array  # (B, H, W) in [0, 1], 1 = product; any H, W (usually the image's)
    fg_tokens: jax.Array  # (B, L) 1.0 on the tokens of P_fg
    bg_tokens: jax.Array  # (B, L) 1.0 on the tokens of P_bg


@functools.lru_cache(maxsize=64)
def area_resize_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights: row i averages the source interval [i * src/dst, (i+1) * src/dst).

    Exact box-filter (area) resampling for any sizes, not only integer ratios; the matrix
    is a trace-time constant, so masks of one shape never recompile anything.
    """
    scale = src / dst
    edges = np.arange(dst + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
    return (overlap / scale).astype(np.float32)


def area_resize(mask: jax.Array, height: int, width: int) -> jax.Array:
    """(B, H, W) -> (B, height, width) by area averaging."""
    rows = jnp.asarray(area_resize_matrix(mask.shape[1], height))
    cols = jnp.asarray(area_resize_matrix(mask.shape[2], width))
    return jnp.einsum("ih,bhw,jw->bij", rows, mask.astype(jnp.float32), cols, precision="highest")


def region_weights(region: Region, height: int, width: int) -> jax.Array:
    """M_r flattened to attention tokens: (B, height * width, 1)."""
    return area_resize(region.product_mask, height, width).reshape(region.product_mask.shape[0], -1, 1)
