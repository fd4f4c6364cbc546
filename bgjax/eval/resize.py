"""PIL's BICUBIC resize as one weight matrix per axis: CLIP's preprocessing and clean-fid both resize with PIL.

PIL resamples each axis separately (width first, then height) with Keys' cubic kernel
(a = -0.5) sampled at half-pixel centres, widened by the downscale factor when shrinking
(antialiasing), and each output's weights normalised over the taps inside the image. The
weights are computed here in float64 as PIL computes them; `jax.image.resize(method="cubic",
antialias=True)` is the same filter with float32 sample positions and lands up to 0.007 grey
levels away from PIL, these matrices within 1e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of PIL's BICUBIC resize of one axis from n_in to n_out pixels."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    w = _keys_cubic((np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / width)
    return w / w.sum(axis=1, keepdims=True)


def resize_axis(x: jax.Array, size: int, axis: int) -> jax.Array:
    """`x` (float32) resized to `size` along `axis`, as one PIL BICUBIC pass."""
    if x.shape[axis] == size:  # PIL skips a pass whose size does not change
        return x
    m = jnp.asarray(bicubic_matrix(x.shape[axis], size), jnp.float32)
    y = jnp.tensordot(m, x, axes=((1,), (axis,)), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, 0, axis)
