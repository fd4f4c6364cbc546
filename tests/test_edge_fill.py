"""The latents at a product's edge refilled before decoding (`bgjax.sampling.edge_fill`): which cells, and that
the fill continues the background (stripes along their orientation, a harmonic function exactly)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bgjax.sampling.edge_fill import edge_cells, neighbour_weights, oriented_fill
from bgjax.sampling.host import EDGE_FILL_NEIGHBOURS as NEIGHBOURS

SIDE = 16


def _hole(first: int = 5, last: int = 10) -> np.ndarray:
    unknown = np.zeros((1, SIDE, SIDE), bool)
    unknown[:, first:last + 1, first:last + 1] = True
    return unknown


def _grid() -> tuple[np.ndarray, np.ndarray]:
    i, j = np.meshgrid(np.arange(SIDE, dtype=np.float32), np.arange(SIDE, dtype=np.float32), indexing="ij")
    return i, j


def test_edge_cells_are_the_cells_holding_product_and_their_four_neighbours():
    """One faint product pixel (any value above 0 counts) in cell (1, 2) of a 4x-downsampling latent: that
    cell and its four neighbours, not the diagonal ones (a cell the product covers whole is not required)."""
    mask = np.zeros((1, 16, 16), np.float32)
    mask[0, 5, 9] = 0.01
    cells = np.asarray(edge_cells(jnp.asarray(mask), 4))
    expected = np.zeros((1, 4, 4), bool)
    for y, x in ((1, 2), (0, 2), (2, 2), (1, 1), (1, 3)):
        expected[0, y, x] = True
    np.testing.assert_array_equal(cells, expected)


@pytest.mark.parametrize("stripes", ["horizontal", "diagonal"])
def test_fill_continues_stripes_through_the_hole(stripes):
    """Stripes (each channel its own phase) run on through a 6 x 6 hole as they were: every filled cell the
    stripe's own value. An isotropic fill (all neighbours alike) misses by more than 1 here, and a fill that
    took the gradient's direction for the stripes' (a sign slip in the orientation) misses on the diagonal."""
    i, j = _grid()
    along = i if stripes == "horizontal" else i + j
    x = np.stack([np.sin(2 * np.pi * along / 5 + c) for c in range(4)], -1)[None]
    unknown = _hole()
    start = np.where(unknown[..., None], 0.0, x).astype(np.float32)
    filled = np.asarray(oriented_fill(jnp.asarray(start), jnp.asarray(unknown)))
    np.testing.assert_array_equal(filled[~unknown], x[~unknown])
    np.testing.assert_allclose(filled[unknown], x[unknown], atol=1e-3)


def test_fill_without_orientation_is_harmonic():
    """A background with no preferred orientation (i^2 - j^2 about the centre: its structure tensor is
    isotropic) is filled with the mean of all eight neighbours, and i^2 - j^2 is harmonic for that mean, so the
    fill gives it back exactly: a fill that stops early (its start is the known cells' mean) or weighs the
    neighbours unevenly does not."""
    i, j = _grid()
    c = (SIDE - 1) / 2
    x = (((i - c) ** 2 - (j - c) ** 2) / 10)[None, ..., None]
    unknown = _hole()
    weights = np.asarray(neighbour_weights(jnp.asarray(x), jnp.asarray(~unknown)))[0]
    length = np.hypot(*np.array(NEIGHBOURS, np.float32).T)
    np.testing.assert_allclose(weights, (1 / length) / (1 / length).sum(), rtol=1e-4)
    filled = np.asarray(oriented_fill(jnp.asarray(np.where(unknown[..., None], 0.0, x)), jnp.asarray(unknown)))
    np.testing.assert_allclose(filled, x, atol=1e-3)


def test_fill_reaches_its_fixed_point_on_noise():
    """Random latents and an irregular hole: the known cells come back bit for bit, and every filled cell is
    its neighbours' weighted mean (the image's border repeated), so the iterations converged."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, SIDE, SIDE, 4)).astype(np.float32)
    unknown = rng.random((2, SIDE, SIDE)) < 0.3
    unknown[:, 4:12, 3:13] = True
    filled = np.asarray(oriented_fill(jnp.asarray(x), jnp.asarray(unknown)))
    np.testing.assert_array_equal(filled[~unknown], x[~unknown])
    weights = np.asarray(neighbour_weights(jnp.asarray(x), jnp.asarray(~unknown)))
    padded = np.pad(filled, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    mean = sum(weights[:, k, None, None, None] * padded[:, 1 + dy: 1 + dy + SIDE, 1 + dx: 1 + dx + SIDE]
               for k, (dy, dx) in enumerate(NEIGHBOURS))
    np.testing.assert_allclose(filled[unknown], mean[unknown], atol=1e-4)
    assert np.abs(filled[unknown] - x[unknown]).mean() > 0.3  # the noise under the hole is gone


def test_no_known_cell_leaves_the_latents_as_they_are():
    x = np.random.default_rng(1).normal(size=(1, 4, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(oriented_fill(jnp.asarray(x), jnp.ones((1, 4, 4), bool))), x)
