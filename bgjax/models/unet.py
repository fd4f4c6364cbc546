"""UNet2DConditionModel (SD-1.x / SD-2.x / SDXL) in Flax linen, NHWC, with diffusers' param names.

The param tree mirrors diffusers' module tree with its dotted names (`down_blocks.0`,
`attentions.1`, `to_out.0`), so conversion is a layout transpose per leaf.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bgjax.models.attention import Attention, Implementation
from bgjax.models.configs import CROSS_ATTN_UP, TEXT_TIME, UNetConfig
from bgjax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv,
    group_norm,
    layer_norm,
    timestep_embedding,
)
from bgjax.models.region import Region, RegionMode, region_weights


@flax.struct.dataclass
class AddedCond:
    """SDXL's added conditioning (diffusers' `added_cond_kwargs`): the pooled, projected embedding of
    the second text encoder and the time ids (original h, w, crop top, left, target h, w) per example."""

    text_embeds: jax.Array  # (B, pooled width)
    time_ids: jax.Array  # (B, 6)


def added_embedding(model: nn.Module, added: AddedCond | None, batch: int) -> jax.Array | None:
    """`add_embedding(concat(text_embeds, sinusoids of the time ids))` of a "text_time" model, else None.

    Called from inside `model`'s compact method, like `encode`."""
    cfg = model.config
    if cfg.addition_embed_type != TEXT_TIME:
        if added is not None:
            raise ValueError("added: this model has no added conditioning (addition_embed_type is not 'text_time')")
        return None
    if added is None:
        raise ValueError("added: an SDXL-type model (addition_embed_type 'text_time') needs the pooled text "
                         "embedding and the time ids (AddedCond)")
    text, ids = jnp.asarray(added.text_embeds), jnp.asarray(added.time_ids)
    width = text.shape[-1] + ids.shape[-1] * cfg.addition_time_embed_dim
    if text.shape[0] != batch or ids.shape[0] != batch or width != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"added: text_embeds {text.shape} and time_ids {ids.shape} for a batch of {batch} give "
                         f"{width} features; the model's add_embedding takes "
                         f"{cfg.projection_class_embeddings_input_dim} (projection_class_embeddings_input_dim)")
    times = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
    features = jnp.concatenate([text.astype(jnp.float32), times.reshape(batch, -1)], axis=-1)
    return TimestepEmbedding(cfg.time_embed_dim, dtype=model.dtype, name="add_embedding")(features.astype(model.dtype))


class FeedForward(nn.Module):
    """GEGLU feed-forward: `net.0.proj` to 2 x 4 x dim, exact-GELU gate, `net.2` back to dim."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(nn.Dense(self.dim * 8, dtype=self.dtype, name="net.0.proj")(x), 2, axis=-1)
        return nn.Dense(self.dim, dtype=self.dtype, name="net.2")(h * nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nn.Module):
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    region_mode: RegionMode = "none"
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, region: Region | None = None,
                 m_r: jax.Array | None = None) -> jax.Array:
        dim = self.heads * self.dim_head

        def attn(name: str) -> Attention:
            return Attention(self.heads, self.dim_head, out_dim=dim, dtype=self.dtype, implementation=self.attention,
                             name=name)

        x = x + attn("attn1")(layer_norm(1e-5, name="norm1")(x), context if self.only_cross_attention else None)
        h = layer_norm(1e-5, name="norm2")(x)
        if region is None or self.region_mode == "none":
            x = x + attn("attn2")(h, context)
        elif self.region_mode == "mask_guided":
            x = x + attn("attn2")(h, context, token_masks=(region.fg_tokens, region.bg_tokens), region_weight=m_r)
        else:  # mask_output: the reference style reaches background positions only
            x = x + ((1.0 - m_r) * attn("attn2")(h, context)).astype(x.dtype)
        return x + FeedForward(dim, dtype=self.dtype, name="ff")(layer_norm(1e-5, name="norm3")(x))


class Transformer2DModel(nn.Module):
    heads: int
    dim_head: int
    depth: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    groups: int = 32
    region_mode: RegionMode = "none"
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, region: Region | None = None) -> jax.Array:
        b, h, w, c = x.shape
        m_r = None if region is None else region_weights(region, h, w)
        inner = self.heads * self.dim_head
        y = group_norm(self.groups, 1e-6, name="norm")(x)
        if self.use_linear_projection:
            y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, padding=0, name="proj_in", dtype=self.dtype)(y).reshape(b, h * w, inner)
        block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.depth):
            y = block(self.heads, self.dim_head, self.only_cross_attention, self.region_mode, dtype=self.dtype,
                      attention=self.attention, name=f"transformer_blocks.{i}")(y, context, region, m_r)
        if self.use_linear_projection:
            y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, padding=0, name="proj_out", dtype=self.dtype)(y.reshape(b, h, w, inner))
        return y + x


def _transformer(block: nn.Module, level: int, name: str) -> Transformer2DModel:
    """The level's transformer, with the dtype, region mode and attention kernel of `block`."""
    cfg = block.config
    channels, heads = cfg.block_out_channels[level], cfg.num_attention_heads[level]
    return Transformer2DModel(heads, channels // heads, cfg.transformer_layers_per_block[level],
                              cfg.use_linear_projection, cfg.only_cross_attention[level],
                              cfg.norm_num_groups, block.region_mode, dtype=block.dtype, attention=block.attention,
                              remat=block.remat, name=name)


def _resnet(block: nn.Module, channels: int, name: str) -> ResnetBlock2D:
    """A resnet of `block`'s config and dtype, recomputed in the backward pass when `block.remat`."""
    cfg = block.config
    cls = nn.remat(ResnetBlock2D) if block.remat else ResnetBlock2D
    return cls(channels, cfg.norm_num_groups, cfg.norm_eps, dtype=block.dtype, name=name)


class DownBlock2D(nn.Module):
    """`CrossAttnDownBlock2D` when the config gives the level cross-attention, else `DownBlock2D`."""

    config: UNetConfig
    level: int
    region_mode: RegionMode = "none"
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
                 region: Region | None = None) -> tuple[jax.Array, list[jax.Array]]:
        cfg, level = self.config, self.level
        channels, skips = cfg.block_out_channels[level], []
        for i in range(cfg.layers_per_block):
            x = _resnet(self, channels, f"resnets.{i}")(x, temb)
            if cfg.has_cross_attention(level):
                x = _transformer(self, level, f"attentions.{i}")(x, context, region)
            skips.append(x)
        if level < len(cfg.block_out_channels) - 1:
            x = Downsample2D(channels, cfg.downsample_padding, dtype=self.dtype, name="downsamplers.0")(x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    config: UNetConfig
    region_mode: RegionMode = "none"
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, region: Region | None = None) -> jax.Array:
        cfg, channels = self.config, self.config.block_out_channels[-1]
        x = _resnet(self, channels, "resnets.0")(x, temb)
        level = len(cfg.block_out_channels) - 1
        x = _transformer(self, level, "attentions.0")(x, context, region)
        return _resnet(self, channels, "resnets.1")(x, temb)


class UpBlock2D(nn.Module):
    """`CrossAttnUpBlock2D` or `UpBlock2D`; `index` counts up blocks from the bottom.

    Takes the `layers_per_block + 1` skips it consumes, shallowest first.
    """

    config: UNetConfig
    index: int
    region_mode: RegionMode = "none"
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array,
                 region: Region | None = None) -> jax.Array:
        cfg = self.config
        level = len(cfg.block_out_channels) - 1 - self.index
        channels = cfg.block_out_channels[level]
        for i, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)
            x = _resnet(self, channels, f"resnets.{i}")(x, temb)
            if cfg.up_block_types[self.index] == CROSS_ATTN_UP:
                x = _transformer(self, level, f"attentions.{i}")(x, context, region)
        if level > 0:
            x = Upsample2D(channels, dtype=self.dtype, name="upsamplers.0")(x)
        return x


def check_latent_shape(cfg: UNetConfig, sample: jax.Array) -> None:
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if sample.ndim != 4 or sample.shape[1] % factor or sample.shape[2] % factor:
        raise ValueError(f"sample: expected NHWC latents with height and width divisible by {factor}, "
                         f"got shape {sample.shape}")
    if sample.shape[-1] != cfg.in_channels:
        raise ValueError(f"sample: expected {cfg.in_channels} channels (NHWC), got shape {sample.shape}")


def encode(model: nn.Module, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
           cond_embedding: jax.Array | None = None, region: Region | None = None,
           added: AddedCond | None = None) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """conv_in, time embedding (plus SDXL's added embedding), down blocks and mid block, shared by the UNet
    and ControlNet (`model`, whose config, dtype, region mode and attention kernel they take).

    Must be called from inside `model`'s compact method: the submodules it creates belong to it, which is
    what gives both models the same top-level names as in diffusers.
    Returns the mid-block output, the time embedding and the skip connections.
    """
    cfg, dtype, region_mode, attention = model.config, model.dtype, model.region_mode, model.attention
    remat = model.remat
    check_latent_shape(cfg, sample)
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    t = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="time_embedding")(t.astype(dtype))
    extra = added_embedding(model, added, sample.shape[0])
    if extra is not None:
        temb = temb + extra
    x = conv(cfg.block_out_channels[0], name="conv_in", dtype=dtype)(sample.astype(dtype))
    if cond_embedding is not None:
        x = x + cond_embedding
    skips = [x]
    for level in range(len(cfg.block_out_channels)):
        x, level_skips = DownBlock2D(cfg, level, region_mode, dtype=dtype, attention=attention, remat=remat,
                                     name=f"down_blocks.{level}")(x, temb, context, region)
        skips += level_skips
    x = UNetMidBlock2DCrossAttn(cfg, region_mode, dtype=dtype, attention=attention, remat=remat, name="mid_block")(
        x, temb, context, region)
    return x, temb, skips


class UNet2DConditionModel(nn.Module):
    """Predicts noise (or v) for NHWC latents; takes ControlNet residuals for skips and mid block, and
    for SDXL-type configs the added conditioning (`added`).

    `region_mode="mask_guided"` makes every cross-attention mask-guided when a `region` is given
    (the paper's CG attention applied in the UNet too; off by default).
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    region_mode: RegionMode = "none"
    attention: Implementation = "auto"  # the attention kernel (bgjax.models.attention)
    # Recompute each resnet's and transformer block's activations in the backward pass instead of keeping
    # them (gradient checkpointing): training at SDXL's 1024 px fits far less memory, for one more forward.
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        down_block_additional_residuals: list[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        region: Region | None = None,
        added: AddedCond | None = None,
    ) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        context = encoder_hidden_states.astype(dtype)
        x, temb, skips = encode(self, sample, timesteps, context, region=region, added=added)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals: expected {len(skips)} residuals, "
                                 f"got {len(down_block_additional_residuals)}")
            skips = [s + r.astype(dtype) for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(dtype)
        n = cfg.layers_per_block + 1
        for i in range(len(cfg.block_out_channels)):
            x = UpBlock2D(cfg, i, self.region_mode, dtype=dtype, attention=self.attention, remat=self.remat,
                          name=f"up_blocks.{i}")(x, skips[-n:], temb, context, region)
            skips = skips[:-n]
        # The head runs in fp32: 4 output channels cost nothing, and the sampler sees no bf16 rounding.
        x = group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(x)
        return conv(cfg.out_channels, name="conv_out", dtype=jnp.float32)(nn.silu(x))
