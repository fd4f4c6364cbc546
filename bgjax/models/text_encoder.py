"""CLIP text encoders (transformers' CLIPTextModel / CLIPTextModelWithProjection names) and the tokenizer
read from local files.

SD-1.x uses OpenAI CLIP ViT-L/14 (quick_gelu); SD-2.x uses OpenCLIP ViT-H with its last
layer dropped (diffusers' checkpoints store 23 layers), so the "penultimate layer" is
simply the final layer of the stored model, followed by `final_layer_norm`. SDXL keeps whole
towers (CLIP ViT-L/14 and OpenCLIP ViT-bigG with its projection) and reads the second-to-last
layer's output without the final norm (`TextEncoding.penultimate_hidden_state`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import flax.linen as nn
import flax.struct
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


@flax.struct.dataclass
class TextEncoding:
    """What SD and SDXL read from a CLIP text tower (transformers' output names)."""

    last_hidden_state: jax.Array  # (B, L, hidden), after final_layer_norm: SD-1.x / SD-2.x's context
    penultimate_hidden_state: jax.Array  # hidden_states[-2]: the second-to-last layer's output, SDXL's context
    pooler_output: jax.Array  # (B, hidden) last_hidden_state at the EOS token; projected by text_projection


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """transformers' pooling position: the first `eos_token_id`, or for configs that say 2 (the value before
    transformers fixed it, kept by SD's and SDXL's configs) the first largest token id."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array, input_embeds: jax.Array | None = None) -> TextEncoding:
        cfg = self.config
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids: {input_ids.shape[-1]} tokens, more than the encoder's "
                             f"{cfg.max_position_embeddings} positions")
        token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embeddings.token_embedding")
        position_embedding = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                      name="embeddings.position_embedding")
        x = token_embedding(input_ids) if input_embeds is None else input_embeds
        x = (x + position_embedding(jnp.arange(input_ids.shape[-1]))).astype(self.dtype)
        before_last = x
        for i in range(cfg.num_hidden_layers):
            before_last = x
            x = CLIPEncoderLayer(cfg, dtype=self.dtype, attention=self.attention, name=f"encoder.layers.{i}")(x)
        last = layer_norm(cfg.layer_norm_eps, name="final_layer_norm")(x)
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
        return TextEncoding(last, before_last, pooled)


class CLIPTextModel(nn.Module):
    """input ids (B, L) -> last hidden state (B, L, hidden), as `CLIPTextModel(...).last_hidden_state`;
    `encode` gives every output SD and SDXL use (`TextEncoding`).

    `input_embeds` replaces the token embeddings (textual-inversion identifiers are
    spliced in there); positions are still added here.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    attention: Implementation = "auto"  # the attention kernel (bgjax.models.attention)

    def setup(self) -> None:
        self.text_model = CLIPTextTransformer(self.config, dtype=self.dtype, attention=self.attention)

    def encode(self, input_ids: jax.Array, input_embeds: jax.Array | None = None) -> TextEncoding:
        return self.text_model(input_ids, input_embeds)

    def __call__(self, input_ids: jax.Array, input_embeds: jax.Array | None = None) -> jax.Array:
        return self.encode(input_ids, input_embeds).last_hidden_state


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' CLIPTextModelWithProjection (SDXL's OpenCLIP ViT-bigG): `encode`'s pooled output is
    `text_projection(pooler_output)`, transformers' `text_embeds`."""

    def setup(self) -> None:
        super().setup()
        self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

    def encode(self, input_ids: jax.Array, input_embeds: jax.Array | None = None) -> TextEncoding:
        out = self.text_model(input_ids, input_embeds)
        # the projection runs in fp32: SDXL's add_embedding reads it beside the time ids' sinusoids
        return out.replace(pooler_output=self.text_projection(out.pooler_output).astype(jnp.float32))


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
