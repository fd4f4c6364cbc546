"""CLIP's image tower (transformers' CLIPVisionModelWithProjection names) and CLIP's preprocessing in JAX.

The param tree mirrors transformers' state dict (`vision_model.embeddings.patch_embedding`,
`vision_model.encoder.layers.0.self_attn.q_proj`, `visual_projection`), so converting a
checkpoint is a rename plus layout transposes (`bgjax.eval.weights`). The encoder layers are
the text encoder's, run without the causal mask.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bgjax.eval.resize import resize_axis
from bgjax.models.configs import ConfigError
from bgjax.models.layers import layer_norm
from bgjax.models.text_encoder import CLIPEncoderLayer

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (CLIPImageProcessor's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers CLIPVisionConfig fields, from a CLIPVisionConfig or a full CLIPConfig `config.json`."""

    hidden_size: int
    intermediate_size: int
    projection_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    raw: dict = dataclasses.field(compare=False, hash=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPVisionConfig:
        def require(field: str, supported: tuple[str, ...], default: str) -> None:
            if d.get(field, default) not in supported:
                raise ConfigError(f"{field}: {d.get(field)!r} is not supported (supported: {', '.join(supported)})")

        if "vision_config" in d:  # a full CLIPConfig: its visual_projection maps to the top-level projection_dim
            require("model_type", ("clip",), "clip")
            d = {**d["vision_config"], "projection_dim": d.get("projection_dim", 512)}
        require("model_type", ("clip_vision_model",), "clip_vision_model")
        require("hidden_act", ("quick_gelu", "gelu"), "quick_gelu")
        cfg = cls(
            hidden_size=int(d.get("hidden_size", 768)),
            intermediate_size=int(d.get("intermediate_size", 3072)),
            projection_dim=int(d.get("projection_dim", 512)),
            num_hidden_layers=int(d.get("num_hidden_layers", 12)),
            num_attention_heads=int(d.get("num_attention_heads", 12)),
            num_channels=int(d.get("num_channels", 3)),
            image_size=int(d.get("image_size", 224)),
            patch_size=int(d.get("patch_size", 32)),
            hidden_act=d.get("hidden_act", "quick_gelu"),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            raw=dict(d),
        )
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"patch_size: {cfg.patch_size} does not divide image_size {cfg.image_size}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"num_attention_heads: {cfg.num_attention_heads} does not divide hidden_size")
        return cfg

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPVisionOutput(NamedTuple):
    image_embeds: jax.Array  # (B, projection_dim), not normalised
    last_hidden_state: jax.Array  # (B, 1 + patches, hidden), before post_layernorm


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg, p = self.config, self.config.patch_size
        x = nn.Conv(cfg.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    name="patch_embedding")(pixel_values)
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)  # row-major patches, as torch's flatten(2) of NCHW
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size)), x], axis=1)
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, name="position_embedding")
        return (x + positions(jnp.arange(cfg.num_positions))).astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.shape[1:] != want:
            raise ValueError(f"pixel_values: expected (B, {', '.join(map(str, want))}) NHWC, got {pixel_values.shape} "
                             f"(see `preprocess`)")
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = layer_norm(cfg.layer_norm_eps, name="pre_layrnorm")(x).astype(self.dtype)  # transformers' spelling
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(cfg, self.dtype, causal=False, name=f"encoder.layers.{i}")(x)
        return x, layer_norm(cfg.layer_norm_eps, name="post_layernorm")(x[:, 0])


class CLIPVisionModelWithProjection(nn.Module):
    """Preprocessed NHWC pixel values (B, S, S, C) -> image embeddings and the last hidden state."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        last, pooled = CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(pixel_values)
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")
        embeds = projection(pooled)
        return CLIPVisionOutput(embeds.astype(jnp.float32), last.astype(jnp.float32))


def _resize_uint8_like_pil(x: jax.Array, size: int, axis: int) -> jax.Array:
    """One bicubic pass along `axis`, rounded and clipped to uint8 levels as PIL's 8-bit resize does."""
    return jnp.clip(jnp.round(resize_axis(x, size, axis)), 0, 255)


def preprocess(images: jax.Array, image_size: int = 224) -> jax.Array:
    """RGB images (B, H, W, 3), uint8 or float in [0, 255] -> CLIP pixel values (B, S, S, 3), S = image_size.

    What transformers' CLIPImageProcessor does: resize so the shorter side is S (the longer
    side becomes int(S * long / short)) with bicubic resampling, centre crop S x S (offsets
    (size - S) // 2), divide by 255, normalise with CLIP's mean and std.

    transformers resizes uint8 images with PIL; here PIL's BICUBIC weights (`bgjax.eval.resize`)
    are applied as PIL does, width first then height, each pass rounded and clipped to uint8
    levels (float inputs are quantised the same way). What remains is PIL's fixed-point
    arithmetic (22-bit coefficients), which can flip a value that lies on a rounding boundary
    by one grey level; `tests/test_eval_networks.py` measures it.
    """
    _, h, w, _ = images.shape
    new_long = int(image_size * max(h, w) / min(h, w))
    new_h, new_w = (new_long, image_size) if w <= h else (image_size, new_long)
    x = _resize_uint8_like_pil(images.astype(jnp.float32), new_w, axis=2)
    x = _resize_uint8_like_pil(x, new_h, axis=1)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
    return (x / 255.0 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
