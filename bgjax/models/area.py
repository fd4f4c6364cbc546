"""Area (box-filter) resampling weights, numpy only: shared by the JAX models and the PyTorch shim."""

from __future__ import annotations

import functools

import numpy as np


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
