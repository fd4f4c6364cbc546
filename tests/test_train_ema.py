"""The EMA against diffusers' EMAModel (PyTorch) on the same parameter sequence (a real run's
exported EMA: tests/test_train_finished.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from bgjax.train.defaults import default_config
from bgjax.train.step import ema_decay, update_ema

SCHEDULES = {
    "default": dict(decay=0.9999),
    "warmup power": dict(decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3),
    "warmup 3/4, min, after": dict(decay=0.995, use_ema_warmup=True, inv_gamma=2.0, power=0.75, min_decay=0.3,
                                   update_after_step=5),
}


def _optim(decay, use_ema_warmup=False, inv_gamma=1.0, power=2 / 3, min_decay=0.0, update_after_step=0):
    optim = default_config().optim
    optim.ema_decay, optim.ema_warmup, optim.ema_inv_gamma, optim.ema_power = decay, use_ema_warmup, inv_gamma, power
    optim.ema_min_decay, optim.ema_update_after_step = min_decay, update_after_step
    return optim


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ema_matches_diffusers_ema_model(name):
    """300 updates of a random walk: the decay of each update and the EMA weights equal EMAModel's
    (which counts optimization_step from 1 and returns 0 for the first update)."""
    kwargs = SCHEDULES[name]
    optim: ml_collections.ConfigDict = _optim(**kwargs)
    rng = np.random.default_rng(0)
    p0 = {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=(32,)).astype(np.float32)}
    torch_params = [torch.nn.Parameter(torch.from_numpy(p0[k].copy())) for k in ("w", "b")]
    reference = EMAModel(torch_params, **kwargs)
    ema, params = jax.tree.map(jnp.asarray, p0), dict(p0)
    update = jax.jit(lambda e, p, n: update_ema(e, p, ema_decay(optim, n)))
    ours, theirs = [], []
    for n in range(1, 301):
        params = {k: (v + 0.05 * rng.normal(size=v.shape) + 0.01).astype(np.float32) for k, v in params.items()}
        with torch.no_grad():
            for tp, k in zip(torch_params, ("w", "b"), strict=True):
                tp.copy_(torch.from_numpy(params[k]))
        reference.step(torch_params)
        theirs.append(reference.cur_decay_value)
        ours.append(float(ema_decay(optim, jnp.int32(n))))
        ema = update(ema, params, jnp.int32(n))
    np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=0)
    for k, shadow in zip(("w", "b"), reference.shadow_params, strict=True):
        ref, got = shadow.numpy(), np.asarray(ema[k])
        diff = np.abs(got - ref)
        print(f"{name} {k}: max abs {diff.max():.3g}, max rel {(diff / np.abs(ref)).max():.3g}")
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
