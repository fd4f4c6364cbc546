"""CLIP text encoder (transformers' CLIPTextModel names) and the tokenizer read from local files.

SD-1.x uses OpenAI CLIP ViT-L/14 (quick_gelu); SD-2.x uses OpenCLIP ViT-H with its last
layer dropped (diffusers' checkpoints store 23 layers), so the "penultimate layer" is
simply the final layer of the stored model, followed by `final_layer_norm`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from bgjax.models.attention import Attention, Implementation
from bgjax.models.configs import CLIPTextConfig
from bgjax.models.layers import layer_norm


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=False)


class EncoderConfig(Protocol):
    """What a CLIP encoder layer reads: a CLIPTextConfig, or the image tower's CLIPVisionConfig."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float


class CLIPEncoderLayer(nn.Module):
    """Pre-LN self-attention + MLP; causal in the text tower, bidirectional in the image tower."""

    config: EncoderConfig
    dtype: jnp.dtype = jnp.float32
    causal: bool = True
    attention: Implementation = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        heads = cfg.num_attention_heads
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm1")(x)
        x = x + Attention(heads, cfg.hidden_size // heads, qkv_bias=True, dtype=self.dtype,
                          names=("q_proj", "k_proj", "v_proj", "out_proj"), implementation=self.attention,
                          name="self_attn")(h, is_causal=self.causal)
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm2")(x)
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="mlp.fc1")(h)
        return x + nn.Dense(cfg.hidden_size, dtype=self.dtype, name="mlp.fc2")(_activation(cfg.hidden_act, h))


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array, input_embeds: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids: {input_ids.shape[-1]} tokens, more than the encoder's "
                             f"{cfg.max_position_embeddings} positions")
        token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embeddings.token_embedding")
        position_embedding = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                      name="embeddings.position_embedding")
        x = token_embedding(input_ids) if input_embeds is None else input_embeds
        x = (x + position_embedding(jnp.arange(input_ids.shape[-1]))).astype(self.dtype)
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(cfg, dtype=self.dtype, attention=self.attention, name=f"encoder.layers.{i}")(x)
        return layer_norm(cfg.layer_norm_eps, name="final_layer_norm")(x)


class CLIPTextModel(nn.Module):
    """input ids (B, L) -> last hidden state (B, L, hidden), as `CLIPTextModel(...).last_hidden_state`.

    `input_embeds` replaces the token embeddings (textual-inversion identifiers are
    spliced in there); positions are still added here.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"  # the attention kernel (bgjax.models.attention)

    @nn.compact
    def __call__(self, input_ids: jax.Array, input_embeds: jax.Array | None = None) -> jax.Array:
        return CLIPTextTransformer(self.config, dtype=self.dtype, attention=self.attention, name="text_model")(
            input_ids, input_embeds)


def load_tokenizer(path: str | Path):
    """transformers' CLIPTokenizer from a local folder; never downloads.

    Either layout loads: `tokenizer.json` (what transformers 5 `save_pretrained` writes, with
    `tokenizer_config.json`) or the classic `vocab.json` + `merges.txt`.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    fast = (path / "tokenizer.json").is_file()
    classic = all((path / f).is_file() for f in ("vocab.json", "merges.txt"))
    if not (fast or classic):
        raise FileNotFoundError(f"{path}: not a CLIP tokenizer folder (needs tokenizer.json, "
                                f"or vocab.json + merges.txt)")
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
