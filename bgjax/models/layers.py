"""Building blocks shared by the UNet, ControlNet and VAE (NHWC, diffusers names)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv(features: int, kernel: int = 3, stride: int = 1, *, name: str, dtype: jnp.dtype,
         padding: int | tuple = 1, zero_init: bool = False) -> nn.Conv:
    """A torch-style Conv2d: symmetric integer padding unless given explicitly."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    init = {"kernel_init": nn.initializers.zeros, "bias_init": nn.initializers.zeros} if zero_init else {}
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=pad, dtype=dtype, name=name, **init)


def group_norm(groups: int, eps: float, *, name: str) -> nn.GroupNorm:
    """GroupNorm with fp32 output, whatever the compute dtype.

    The activation after it runs in fp32 and the next conv/dense casts to the compute dtype;
    XLA fuses the cast into the norm, so this costs no memory traffic and removes one bf16
    rounding per block (torch's autocast does the same).
    """
    return nn.GroupNorm(groups, epsilon=eps, dtype=jnp.float32, name=name)


def layer_norm(eps: float, *, name: str) -> nn.LayerNorm:
    """LayerNorm with fp32 output, for the same reason as `group_norm`."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' `get_timestep_embedding`: sinusoids of the (possibly fractional) timestep."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1")(x))
        h = conv(self.out_channels, name="conv1", dtype=self.dtype)(h)
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2")(h))
        h = conv(self.out_channels, name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding=0, name="conv_shortcut", dtype=self.dtype)(x)
        return x + h


class Downsample2D(nn.Module):
    """Strided 3x3 conv; the VAE pads (0, 1) on the bottom/right instead of 1 all round."""

    channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.padding if self.padding else ((0, 1), (0, 1))
        return conv(self.channels, 3, 2, padding=pad, name="conv", dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour, exactly torch's
        return conv(self.channels, name="conv", dtype=self.dtype)(x)
