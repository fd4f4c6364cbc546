"""What the benchmarks in tools/ share: random weights of given shapes, and a median wall time."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def random_params(shapes, seed: int = 0):
    """Normal(0, 0.02)-looking arrays of these ShapeDtypeStructs' shapes and dtypes (zero-initialised convs too),
    cut from one pool of 2**22 host draws per dtype at random offsets: the models' own `init` compiles each
    model's forward, a device program per leaf compiles for minutes on a CPU, and 1.4e9 fresh host draws
    take 46 s (an H200 host). Timing needs no more randomness than that."""
    rng = np.random.default_rng(seed)
    base = (0.02 * rng.standard_normal(2**22 + 2**16, np.float32))
    pools = {}

    def leaf(s):
        pool = pools.setdefault(s.dtype, base.astype(s.dtype))
        start = int(rng.integers(2**16))
        return jnp.asarray(np.resize(pool[start:], s.shape))

    return jax.tree.map(leaf, shapes)


def median_time(fn, sync=jax.block_until_ready, warm: int = 3, reps: int = 10) -> float:
    """Median seconds of `reps` calls of `fn` after `warm` calls, each synchronised by `sync(result)`."""
    for _ in range(warm):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
