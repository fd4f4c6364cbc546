"""Multi-head attention through `jax.nn.dot_product_attention`, backend chosen per platform.

cuDNN's fused attention is 4x faster than XLA's for SD's 4096-token self-attention on an
H200 (docs/bench/). It is used where it is known to work and to pay: fp16/bf16 inputs, head
dims a multiple of 8 up to 128, and an even key length. Everything else goes through XLA:
CPU, TPU, fp32, CLIP's 77-token cross-attention contexts (cuDNN rejects odd key lengths when
training), SD-1.5's 160-wide heads (only 256 tokens; XLA measured as fast) and the VAE's
single 512-wide head.
"""

from __future__ import annotations

import logging
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from bgjax.models.layers import group_norm

Implementation = Literal["auto", "xla", "cudnn"]

_log = logging.getLogger(__name__)
_implementation: Implementation = "auto"


def set_attention_implementation(impl: Implementation) -> None:
    """Force 'xla' or 'cudnn' everywhere, or go back to 'auto' (per-call choice)."""
    global _implementation
    if impl not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention implementation must be auto, xla or cudnn, got {impl!r}")
    _implementation = impl


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
    head_dim = q.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and k.dtype == q.dtype
        and head_dim % 8 == 0
        and head_dim <= 128
        and k.shape[1] % 2 == 0
    )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    implementation: Implementation | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for (batch, length, heads, head_dim) inputs."""
    impl = implementation or _implementation
    if impl == "auto":
        impl = "cudnn" if cudnn_supports(q, k) else "xla"
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as e:
            if implementation == "cudnn":
                raise
            _log.warning("cuDNN attention unavailable for q%s %s (%s); using XLA", q.shape, q.dtype, e)
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")


def mask_guided_attention(q: jax.Array, k: jax.Array, v: jax.Array, fg_tokens: jax.Array, bg_tokens: jax.Array,
                          region_weight: jax.Array) -> jax.Array:
    """Two softmaxes over the foreground / background key sets, blended per query by M_r."""

    def attend(tokens: jax.Array) -> jax.Array:
        # log m on the logits is a boolean key mask; XLA, as the keys are CLIP's 77 tokens.
        mask = (tokens > 0)[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla").astype(jnp.float32)

    m = region_weight[..., None].astype(jnp.float32)  # (B, T, 1, 1) against (B, T, heads, d)
    return (m * attend(fg_tokens) + (1.0 - m) * attend(bg_tokens)).astype(q.dtype)


class Attention(nn.Module):
    """diffusers' `Attention` (to_q/to_k/to_v/to_out.0), also transformers' CLIP naming.

    With `norm_groups` set it is the VAE's spatial self-attention: it takes NHWC input,
    applies `group_norm` first and adds the residual, as diffusers' Attention does with
    `norm_num_groups` and `residual_connection=True`.
    """

    heads: int
    dim_head: int
    out_dim: int | None = None
    qkv_bias: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out.0")
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, is_causal: bool = False,
                 token_masks: tuple[jax.Array, jax.Array] | None = None, region_weight: jax.Array | None = None):
        """With `token_masks` (fg, bg: (B, L)) and `region_weight` M_r (B, T, 1), this is the
        mask-guided cross-attention y = M_r softmax(QK^T/sqrt(d) + log m_fg) V
        + (1 - M_r) softmax(QK^T/sqrt(d) + log m_bg) V, before the output projection."""
        residual, spatial_shape = x, None
        if self.norm_groups is not None:
            x = group_norm(self.norm_groups, self.norm_eps, name="group_norm")(x)
            spatial_shape = x.shape
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q_name, k_name, v_name, out_name = self.names

        def project(name: str, t: jax.Array) -> jax.Array:
            y = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(t)
            return y.reshape(*y.shape[:-1], self.heads, self.dim_head)

        q, k, v = project(q_name, x), project(k_name, context), project(v_name, context)
        if token_masks is None:
            y = dot_product_attention(q, k, v, is_causal=is_causal)
        else:
            y = mask_guided_attention(q, k, v, *token_masks, region_weight)
        y = y.reshape(*y.shape[:-2], inner)
        y = nn.Dense(self.out_dim or x.shape[-1], dtype=self.dtype, name=out_name)(y)
        if spatial_shape is not None:
            y = y.reshape(spatial_shape) + residual
        return y
