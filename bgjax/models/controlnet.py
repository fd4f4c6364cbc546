"""ControlNetModel in Flax: a trainable copy of the UNet's encoder half with zero-initialised outputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bgjax.models.attention import Implementation
from bgjax.models.configs import UNetConfig
from bgjax.models.layers import conv
from bgjax.models.region import Region, RegionMode, area_resize
from bgjax.models.unet import AddedCond, encode


class ControlNetConditioningEmbedding(nn.Module):
    """Image-resolution condition -> latent-resolution features (zero-initialised `conv_out`)."""

    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        channels = self.block_out_channels
        x = nn.silu(conv(channels[0], name="conv_in", dtype=self.dtype)(cond))
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            x = nn.silu(conv(c_in, name=f"blocks.{2 * i}", dtype=self.dtype)(x))
            x = nn.silu(conv(c_out, stride=2, name=f"blocks.{2 * i + 1}", dtype=self.dtype)(x))
        return conv(self.out_channels, name="conv_out", dtype=self.dtype, zero_init=True)(x)


class ControlNetModel(nn.Module):
    """Returns (down-block residuals, mid-block residual), each scaled by `conditioning_scale`.

    The paper's branches are ControlNets with a `region_mode`: CG's cross-attention is
    mask-guided ("mask_guided"); PG's cross-attention outputs are zeroed at product positions
    ("mask_output"), and with `mask_residuals` so are its residuals.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    region_mode: RegionMode = "none"
    mask_residuals: bool = False
    attention: Implementation = "auto"  # the attention kernel (bgjax.models.attention)
    remat: bool = False  # gradient checkpointing, as the UNet's

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
        region: Region | None = None,
        added: AddedCond | None = None,
    ) -> tuple[list[jax.Array], jax.Array]:
        cfg, dtype = self.config, self.dtype
        factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        want = (sample.shape[0], sample.shape[1] * factor, sample.shape[2] * factor, cfg.conditioning_channels)
        if controlnet_cond.shape != want:
            raise ValueError(f"controlnet_cond: expected NHWC shape {want} for latents {sample.shape}, "
                             f"got {controlnet_cond.shape}")
        cond = ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                               dtype=dtype, name="controlnet_cond_embedding")
        x, _, skips = encode(self, sample, timesteps, encoder_hidden_states.astype(dtype),
                             cond(controlnet_cond.astype(dtype)), region, added)
        down = [
            conv(s.shape[-1], 1, padding=0, zero_init=True, name=f"controlnet_down_blocks.{i}", dtype=dtype)(s)
            for i, s in enumerate(skips)
        ]
        mid = conv(x.shape[-1], 1, padding=0, zero_init=True, name="controlnet_mid_block", dtype=dtype)(x)
        outputs = [*down, mid]
        if self.mask_residuals and region is not None:
            outputs = [r * (1.0 - area_resize(region.product_mask, *r.shape[1:3])[..., None]).astype(r.dtype)
                       for r in outputs]
        return [r * conditioning_scale for r in outputs[:-1]], outputs[-1] * conditioning_scale


def controlnet_params_from_unet(unet_params: dict, controlnet_params: dict) -> dict:
    """ControlNet params with the UNet's encoder weights copied in, as `ControlNetModel.from_unet`."""
    shared = ("conv_in", "time_embedding", "add_embedding", "mid_block")
    out = dict(controlnet_params)
    for name in controlnet_params:
        if name in shared or name.startswith("down_blocks."):
            out[name] = jax.tree_util.tree_map(jnp.array, unet_params[name])
    return out
