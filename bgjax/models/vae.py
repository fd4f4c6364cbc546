"""AutoencoderKL (the SD VAE) in Flax, NHWC, with diffusers' param names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bgjax.models.attention import Attention, Implementation
from bgjax.models.configs import VAEConfig
from bgjax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

VAE_EPS = 1e-6


class UNetMidBlock2D(nn.Module):
    """resnet, single-head spatial self-attention, resnet; no time embedding."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.groups, VAE_EPS, dtype=self.dtype, name="resnets.0")(x)
        if self.add_attention:
            x = Attention(1, self.channels, qkv_bias=True, norm_groups=self.groups, norm_eps=VAE_EPS,
                          dtype=self.dtype, implementation=self.attention, name="attentions.0")(x)
        return ResnetBlock2D(self.channels, self.groups, VAE_EPS, dtype=self.dtype, name="resnets.1")(x)


class ResnetStack2D(nn.Module):
    """diffusers' DownEncoderBlock2D (`resample="down"`) and UpDecoderBlock2D (`resample="up"`)."""

    channels: int
    num_layers: int
    groups: int
    resample: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets.{j}")(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, padding=0, dtype=self.dtype, name="downsamplers.0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers.0")(x)
        return x


def _out(cfg: VAEConfig, channels: int, x: jax.Array) -> jax.Array:
    # fp32 head, as in the UNet: pixels and latent moments carry no bf16 rounding.
    x = nn.silu(group_norm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out")(x))
    return conv(channels, name="conv_out", dtype=jnp.float32)(x)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        x = conv(cfg.block_out_channels[0], name="conv_in", dtype=dtype)(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = ResnetStack2D(channels, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < last else None,
                              dtype=dtype, name=f"down_blocks.{i}")(x)
        x = UNetMidBlock2D(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                           dtype=dtype, attention=self.attention, name="mid_block")(x)
        return _out(cfg, 2 * cfg.latent_channels, x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        x = conv(cfg.block_out_channels[-1], name="conv_in", dtype=dtype)(z)
        x = UNetMidBlock2D(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                           dtype=dtype, attention=self.attention, name="mid_block")(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            x = ResnetStack2D(channels, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < last else None,
                              dtype=dtype, name=f"up_blocks.{i}")(x)
        return _out(cfg, cfg.out_channels, x)


class AutoencoderKL(nn.Module):
    """`encode` gives the latent Gaussian's (mean, logvar); `decode` maps latents back to images.

    Images are NHWC in [-1, 1]. Latents here are the VAE's raw latents: multiply by
    `scaling_factor` (after subtracting `shift_factor`) for the diffusion model, as diffusers.

    Asked for float16 with the config's `force_upcast` (SDXL's VAE: its decoder's activations pass
    fp16's 65504), it computes in float32, as diffusers does; bfloat16, whose range is fp32's, is kept.
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"  # the attention kernel (bgjax.models.attention)

    @property
    def compute_dtype(self) -> jnp.dtype:
        if jnp.dtype(self.dtype) == jnp.float16 and self.config.force_upcast:
            return jnp.float32
        return self.dtype

    def setup(self) -> None:
        dtype = self.compute_dtype
        self.encoder = Encoder(self.config, dtype=dtype, attention=self.attention)
        self.decoder = Decoder(self.config, dtype=dtype, attention=self.attention)
        n = 2 * self.config.latent_channels
        self.quant_conv = conv(n, 1, padding=0, name="quant_conv", dtype=dtype)
        self.post_quant_conv = conv(self.config.latent_channels, 1, padding=0, name="post_quant_conv", dtype=dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.quant_conv(self.encoder(images.astype(self.compute_dtype)))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.decoder(self.post_quant_conv(latents.astype(self.compute_dtype)))

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruct: the posterior mean, or a sample when `rng` is given."""
        mean, logvar = self.encode(images)
        return self.decode(mean if rng is None else sample_latent(rng, mean, logvar))


def sample_latent(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
