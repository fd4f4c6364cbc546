"""The latents at a product's edge refilled from the background around them, before the VAE decodes them.

Why: a latent cell spans factor x factor pixels (4 x 4 on the bundled model), so a cell the product's edge crosses
holds product and background at once, and the decoder spreads that mix into the background pixels beside the
product: a rim of the product's colour (`bgjax.data.synthetic.halo`). The cells next to those carry some of it
too (the decoder reaches past one cell). Those cells are replaced by the background continued from outside them
(`oriented_fill`: smooth, and along the pattern's orientation, so stripes run on), the image is decoded, and the
product is pasted back over its own pixels. The cost: within about two cells of the product the background is
that continuation, not the model's drawing (no contact shadow; a pattern without one orientation is smoothed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bgjax.sampling.host import EDGE_FILL_ANISOTROPY, EDGE_FILL_NEIGHBOURS


def edge_cells(mask: jax.Array, factor: int) -> jax.Array:
    """(B, h, w) pixel mask (product > 0) -> (B, h / factor, w / factor) bool: the latent cells holding any
    product pixel, and their four neighbours."""
    batch, height, width = mask.shape
    cells = mask.reshape(batch, height // factor, factor, width // factor, factor).max(axis=(2, 4)) > 0
    padded = jnp.pad(cells, ((0, 0), (1, 1), (1, 1)))
    return (cells | padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:])


def neighbour_weights(x: jax.Array, known: jax.Array) -> jax.Array:
    """(B, 8) weights of `host.EDGE_FILL_NEIGHBOURS`, from the structure tensor of `x` (B, h, w, C) over the
    `known` (B, h, w) cells whose four neighbours are known too: along the dominant orientation of the
    background's pattern (perpendicular to its mean gradient) a neighbour weighs most, across it least, by how
    coherent the pattern is (0 for no preferred orientation: then all eight weigh alike, by inverse distance).
    They sum to 1."""
    gy = (x[:, 2:, 1:-1] - x[:, :-2, 1:-1]) / 2
    gx = (x[:, 1:-1, 2:] - x[:, 1:-1, :-2]) / 2
    inner = (known[:, 1:-1, 1:-1] & known[:, :-2, 1:-1] & known[:, 2:, 1:-1] & known[:, 1:-1, :-2]
             & known[:, 1:-1, 2:])[..., None]
    jxx, jyy, jxy = ((jnp.where(inner, a * b, 0)).sum(axis=(1, 2, 3)) for a, b in ((gx, gx), (gy, gy), (gx, gy)))
    theta = 0.5 * jnp.arctan2(2 * jxy, jxx - jyy)  # the mean gradient's direction, from the x axis
    coherence = jnp.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / jnp.maximum(jxx + jyy, 1e-12)
    d = jnp.array(EDGE_FILL_NEIGHBOURS, jnp.float32)
    length = jnp.linalg.norm(d, axis=1)
    across = (d[:, 0] * jnp.sin(theta)[:, None] + d[:, 1] * jnp.cos(theta)[:, None]) / length
    weights = jnp.exp(-EDGE_FILL_ANISOTROPY * coherence[:, None] * across ** 2) / length
    return weights / weights.sum(axis=1, keepdims=True)


def oriented_fill(x: jax.Array, unknown: jax.Array) -> jax.Array:
    """`x` (B, h, w, C) with its `unknown` (B, h, w) cells filled from the others: each unknown cell the
    `neighbour_weights` mean of its eight neighbours (the image's border repeated), the known cells fixed; a
    harmonic fill stretched along the background's pattern, so stripes run on through the hole. Jacobi
    iterations from the known cells' mean, 2 max(h, w)^2 of them: the slowest error mode of a hole as wide as the
    latent shrinks by about e^-pi^2 over them. An image with no known cell is returned as it is."""
    _, height, width, _ = x.shape
    known = ~unknown
    count = known.sum(axis=(1, 2))[:, None, None, None]
    mean = jnp.where(known[..., None], x, 0).sum(axis=(1, 2), keepdims=True) / jnp.maximum(count, 1)
    weights = neighbour_weights(x, known)[:, :, None, None, None]
    fixed = known[..., None]

    def relax(_, z):
        p = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        shifted = jnp.stack([p[:, 1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width]
                             for dy, dx in EDGE_FILL_NEIGHBOURS], 1)
        return jnp.where(fixed, x, (weights * shifted).sum(axis=1))

    filled = jax.lax.fori_loop(0, 2 * max(height, width) ** 2, relax, jnp.where(fixed, x, mean))
    return jnp.where(count > 0, filled, x)


def refill_edge(x: jax.Array, mask: jax.Array, factor: int) -> jax.Array:
    """Latents `x` (B, h / factor, w / factor, C) with the `edge_cells` of the product `mask` (B, h, w)
    refilled from the background around them (`oriented_fill`)."""
    return oriented_fill(x.astype(jnp.float32), edge_cells(mask, factor))
