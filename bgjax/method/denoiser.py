"""UNet + CG + PG as one noise predictor: eps(z_t, t, E, c_cg, c_pg, M) (and SDXL's added conditioning)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from bgjax import model_dir
from bgjax.method.config import MethodConfig
from bgjax.method.store import load_method_config
from bgjax.models.attention import Implementation
from bgjax.models.region import Region
from bgjax.models.unet import AddedCond


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """The frozen UNet plus the optional branches; hashable, so a jitted caller can close over it.

    `params` is {"unet": ..., "cg": ..., "pg": ...} (branch entries only for branches present).
    A branch runs when it exists and its condition is given: with no reference, PG is skipped.
    `added` is SDXL's pooled embedding and time ids, for the UNet and both branches alike.
    """

    unet: nn.Module
    cg: nn.Module | None = None
    pg: nn.Module | None = None

    def __call__(self, params: dict, latents: jax.Array, timesteps: jax.Array, context: jax.Array, region: Region,
                 cg_cond: jax.Array | None = None, pg_cond: jax.Array | None = None,
                 lambda_cg: float | jax.Array = 1.0, lambda_pg: float | jax.Array = 1.0,
                 added: AddedCond | None = None) -> jax.Array:
        down, mid = None, None
        for branch, name, cond, scale in ((self.cg, "cg", cg_cond, lambda_cg), (self.pg, "pg", pg_cond, lambda_pg)):
            if branch is None or cond is None:
                continue
            d, m = branch.apply({"params": params[name]}, latents, timesteps, context, cond, scale, region, added)
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return self.unet.apply({"params": params["unet"]}, latents, timesteps, context, down, mid, region, added)


def load_denoiser(model: Path, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                  attention: Implementation = "auto") -> tuple[Denoiser, dict, MethodConfig]:
    """The denoiser of a bgjax model directory, built as its `method.json` says (`dtype` and
    `param_dtype` as in `model_dir.load_component`, `attention` the kernel, `bgjax.models.attention`).

    Branches whose folder is absent (a base model, or a stage-1 model without PG) are None.
    """
    model = Path(model)
    config = load_method_config(model)
    unet, params = model_dir.load_component(model, "unet", dtype, param_dtype, attention=attention,
                                            **config.module_options("unet"))
    modules, all_params = {"unet": unet}, {"unet": params}
    present = model_dir.components(model)
    for kind in ("cg", "pg"):
        if kind in present:
            modules[kind], all_params[kind] = model_dir.load_component(model, kind, dtype, param_dtype,
                                                                       attention=attention,
                                                                       **config.module_options(kind))
    return Denoiser(**modules), all_params, config
