"""The product region that mask-guided cross-attention and PG's output masking need.

`Region` carries the product mask at any resolution and the prompt's foreground and
background token sets; each attention layer area-resizes the mask to its own h x w.
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from bgjax.models.area import area_resize_matrix

# none: plain cross-attention. mask_guided: CG's y = M_r A_fg + (1 - M_r) A_bg.
# mask_output: PG's y <- (1 - M_r) y on every cross-attention output.
RegionMode = Literal["none", "mask_guided", "mask_output"]


@flax.struct.dataclass
class Region:
    product_mask: jax.Array  # (B, H, W) in [0, 1], 1 = product; any H, W (usually the image's)
    fg_tokens: jax.Array  # (B, L) 1.0 on the tokens of P_fg
    bg_tokens: jax.Array  # (B, L) 1.0 on the tokens of P_bg


def area_resize(mask: jax.Array, height: int, width: int) -> jax.Array:
    """(B, H, W) -> (B, height, width) by area averaging."""
    rows = jnp.asarray(area_resize_matrix(mask.shape[1], height))
    cols = jnp.asarray(area_resize_matrix(mask.shape[2], width))
    return jnp.einsum("ih,bhw,jw->bij", rows, mask.astype(jnp.float32), cols, precision="highest")


def region_weights(region: Region, height: int, width: int) -> jax.Array:
    """M_r flattened to attention tokens: (B, height * width, 1)."""
    return area_resize(region.product_mask, height, width).reshape(region.product_mask.shape[0], -1, 1)
