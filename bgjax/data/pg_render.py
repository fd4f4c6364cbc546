"""PG's perturbed reference rendered on the accelerator, from parameters the loader drew.

The loader (`bgjax.data.pipeline.PGPerturb`) adds `draw_pg_params`' small arrays and the partner
image to each example; the trainer calls `pg_condition(batch)` inside its jitted step. The render equals the numpy
reference `bgjax.data.augment.render_pg` bit for bit on any backend: shapes are integer row spans
(compared with integer pixel coordinates), the dilation a window count from integer prefix sums,
the shift a gather, and uint8 -> [-1, 1] a lookup of numpy's own 256 values, so no floating-point
rounding (fused multiply-adds, reciprocal division) can differ.

Each image is mixed with its own `pg_partner_image`, which the loader drew for that example, so
the render does not depend on how the batch is laid out over devices, processes or micro-batches.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bgjax.data.augment import to_float

__all__ = ["pg_condition", "pg_render"]

_LEVELS = to_float(np.arange(256, dtype=np.uint8))  # to_float of every uint8 value, computed by numpy


def _fill(spans: jax.Array, width: int) -> jax.Array:
    """(S, H, 2) row spans -> (H, W) bool union."""
    x = jnp.arange(width, dtype=spans.dtype)
    return jnp.any((x >= spans[..., :1]) & (x < spans[..., 1:]), axis=0)


def _dilate_axis(mask: jax.Array, k: jax.Array, axis: int) -> jax.Array:
    """Pixels within k of a set pixel along `axis`, for a traced k: the count of set pixels in the
    window [i - k, i + k] as a difference of prefix sums (as numpy's `dilate` does)."""
    n = mask.shape[axis]
    pad = [(0, 0)] * mask.ndim
    pad[axis] = (1, 0)
    prefix = jnp.pad(jnp.cumsum(mask, axis=axis, dtype=jnp.int32), pad)  # prefix[j] = set pixels in [0, j)
    i = jnp.arange(n)
    upper = jnp.take(prefix, jnp.clip(i + k + 1, 0, n), axis=axis)
    lower = jnp.take(prefix, jnp.clip(i - k, 0, n), axis=axis)
    return upper > lower


def _translate(array: jax.Array, dy: jax.Array, dx: jax.Array) -> jax.Array:
    """Shift (H, W, ...) by dy rows and dx columns; vacated pixels are 0 (any shift, even out of frame)."""
    height, width = array.shape[:2]
    ys, xs = jnp.arange(height) - dy, jnp.arange(width) - dx
    inside = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]
    moved = array[jnp.clip(ys, 0, height - 1)][:, jnp.clip(xs, 0, width - 1)]
    return jnp.where(inside.reshape(inside.shape + (1,) * (array.ndim - 2)), moved, jnp.zeros((), array.dtype))


def _render_one(image, partner, mask, k, shift, hole_spans, mix_spans):
    width = mask.shape[1]
    # dilation by a (2k+1)^2 square is separable: rows, then columns
    hole = _dilate_axis(_dilate_axis(mask > 0, k, 0), k, 1) | _fill(hole_spans, width)
    mixed = jnp.where(_fill(mix_spans, width)[..., None], partner, image)
    c_pg = jnp.where(hole[..., None], np.float32(0.0), jnp.asarray(_LEVELS)[mixed])
    return _translate(c_pg, shift[0], shift[1]), _translate(hole, shift[0], shift[1])


_render = jax.jit(jax.vmap(_render_one))


def pg_render(batch: Mapping[str, np.ndarray | jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(c_pg (B, H, W, 3) float32 in [-1, 1], M' (B, H, W) bool) from a batch's `image` (B, H, W, 3)
    uint8, `pg_partner_image` (B, H, W, 3) uint8, `mask` (B, H, W) (nonzero: product) and `pg_*`
    parameters (see `draw_pg_params`)."""
    return _render(batch["image"], batch["pg_partner_image"], batch["mask"], batch["pg_dilation"],
                   batch["pg_shift"], batch["pg_hole_spans"], batch["pg_mix_spans"])


def pg_condition(batch: Mapping[str, np.ndarray | jax.Array]) -> jax.Array:
    """c_pg (B, H, W, 3) float32 in [-1, 1]: PG's perturbed reference, to call inside a jitted step."""
    return pg_render(batch)[0]
