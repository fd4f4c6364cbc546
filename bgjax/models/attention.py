"""Multi-head attention through one function, `dot_product_attention`, with the kernel chosen per call.

The choice is a module field (`Attention.implementation`, set model-wide by `components.build(...,
attention=...)`), so jit sees it and no global state is read at trace time:

- "xla": XLA's attention everywhere.
- "cudnn": cuDNN's fused kernel wherever it applies (GPU, fp16/bf16, head dims a multiple of 8 up to
  128); an odd key length (CLIP's 77-token contexts) is padded to an even one and cut off by cuDNN's
  padding lengths, since cuDNN rejects odd key lengths when training, and a key mask (mask-guided
  attention's token sets) becomes the kept keys gathered to the front and their count, since cuDNN takes
  no boolean mask. 4.8x faster than XLA for SD's 4096-token self-attention, forward and backward, on an
  H200 (docs/bench/). Elsewhere XLA.
- "flash": Pallas flash attention (the TPU kernel of `jax.experimental.pallas.ops.tpu`) for unmasked
  self-attention whose length is a multiple of 128; head dims are zero-padded to 128, as MaxDiffusion
  does. XLA's plain path writes every (T, T) score matrix to HBM; the kernel never does. Elsewhere XLA.
  On a CPU it runs in Pallas' TPU interpret mode only (`pltpu.force_tpu_interpret_mode()`: the tests).
- "auto" (default): cuDNN on GPUs where it applies; flash on TPUs for self-attention of at least
  FLASH_MIN_TOKENS tokens (SD's 4096- and 1024-token layers); XLA otherwise (CPU, fp32, the VAE's
  single 512-wide head, SD-1.5's 160-wide heads).

On the CPU, where XLA's attention would hold more than CPU_SCORE_BYTES of scores at once, "auto" splits the
queries into chunks and attends chunk after chunk inside the program (`chunked_attention`): the same values,
with one chunk's scores alive (the bundled model at 512 px: 70 GB unchunked). XLA's cost analysis counts the
chunk loop's body once, so FLOP counts of chunked programs are low; "xla" never chunks.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

from bgjax.models.layers import group_norm

Implementation = Literal["auto", "xla", "cudnn", "flash"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "flash")
FLASH_MIN_TOKENS = 1024
_FLASH_BLOCKS = (512, 256, 128)
CPU_SCORE_BYTES = 1 << 28  # float32 scores of one chunk of queries, all heads and batch rows

_log = logging.getLogger(__name__)


def check_implementation(impl: str) -> Implementation:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {impl!r}")
    return impl


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
    """Whether cuDNN's fused kernel takes these (B, T, heads, head_dim) inputs (checked at trace time)."""
    head_dim = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
            and head_dim % 8 == 0 and head_dim <= 128)


def flash_supports(q: jax.Array, k: jax.Array) -> bool:
    """Whether the Pallas flash kernel takes these inputs: self-attention, a length it tiles."""
    return q.shape[1] == k.shape[1] and q.shape[1] % _FLASH_BLOCKS[-1] == 0


def choose(impl: Implementation, q: jax.Array, k: jax.Array, masked: bool = False, causal: bool = False) -> str:
    """The kernel a call runs: "xla", "chunked" (XLA by query chunks), "cudnn" or "flash" (see the module
    docstring)."""
    check_implementation(impl)
    # Odd key lengths are padded and key masks gathered (cudnn_keys), except under a causal mask, which would
    # then cover the moved keys too.
    if impl in ("auto", "cudnn") and cudnn_supports(q, k) and not (causal and (masked or k.shape[1] % 2)):
        return "cudnn"
    tpu_long = jax.default_backend() == "tpu" and q.shape[1] >= FLASH_MIN_TOKENS
    if (impl == "flash" or (impl == "auto" and tpu_long)) and not (masked or causal) and flash_supports(q, k):
        return "flash"
    if impl == "auto" and not causal and cpu_query_chunk(q.shape[0] * q.shape[2], q.shape[1], k.shape[1]):
        return "chunked"
    return "xla"


def cudnn_keys(k: jax.Array, v: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(k, v, key lengths) in the form cuDNN takes. cuDNN takes no boolean mask (it asks for a bias as long as
    the keys), but it has a padding mask: a key mask (B, 1, 1, S) becomes the kept keys gathered to the front
    (in order) and their count. An odd key length (CLIP's 77 tokens), which cuDNN rejects when training, gets
    one key more that the lengths leave out. Lengths are None when every key counts."""
    lengths = None
    if mask is not None:
        keep = jnp.broadcast_to(mask, (mask.shape[0], 1, 1, k.shape[1]))[:, 0, 0, :]
        order = jnp.argsort(~keep, axis=-1, stable=True)[:, :, None, None]
        k, v = jnp.take_along_axis(k, order, axis=1), jnp.take_along_axis(v, order, axis=1)
        lengths = jnp.sum(keep, axis=-1, dtype=jnp.int32)
    if k.shape[1] % 2:
        if lengths is None:
            lengths = jnp.full((k.shape[0],), k.shape[1], jnp.int32)
        k, v = (jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0))) for a in (k, v))
    return k, v, lengths


def cpu_query_chunk(rows: int, q_len: int, k_len: int) -> int | None:
    """Queries per chunk on the CPU for `rows` = batch x heads, or None when all the scores fit CPU_SCORE_BYTES
    (or the backend is not the CPU)."""
    per_query = rows * k_len * 4
    if jax.default_backend() != "cpu" or q_len * per_query <= CPU_SCORE_BYTES:
        return None
    return max(1, CPU_SCORE_BYTES // per_query)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, chunk: int) -> jax.Array:
    """XLA's attention over `chunk` queries at a time, one chunk after another (`lax.map`, one loop in the
    program): the queries are padded to whole chunks and the padding's outputs dropped."""
    batch, length = q.shape[:2]
    count = -(-length // chunk)
    q = jnp.pad(q, ((0, 0), (0, count * chunk - length), (0, 0), (0, 0)))
    chunks = q.reshape(batch, count, chunk, *q.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(lambda c: jax.nn.dot_product_attention(c, k, v, mask=mask, implementation="xla"), chunks)
    return out.swapaxes(0, 1).reshape(batch, count * chunk, *out.shape[3:])[:, :length]


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, is_causal: bool) -> jax.Array:
    k, v, lengths = cudnn_keys(k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, key_value_seq_lengths=lengths,
                                        implementation="cudnn")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Pallas flash attention for (B, T, heads, head_dim) self-attention, T a multiple of 128."""
    head_dim, length = q.shape[-1], q.shape[1]
    block = next(b for b in _FLASH_BLOCKS if length % b == 0)
    pad = -head_dim % 128  # zero columns change no dot product; the output's are sliced off

    def heads_first(a: jax.Array) -> jax.Array:
        return jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, pad))).transpose(0, 2, 1, 3)

    sizes = pallas_flash.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                                    block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                                    block_q_dkv=block, block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    out = pallas_flash.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                                       sm_scale=1.0 / math.sqrt(head_dim), block_sizes=sizes)
    return out.transpose(0, 2, 1, 3)[..., :head_dim]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          is_causal: bool = False, implementation: Implementation = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for (batch, length, heads, head_dim) inputs; `mask` (B, 1, 1, S) keeps
    the keys where it is true."""
    kernel = choose(implementation, q, k, masked=mask is not None, causal=is_causal)
    if kernel == "cudnn":
        try:
            return _cudnn(q, k, v, mask, is_causal)
        except (ValueError, NotImplementedError, RuntimeError) as e:  # cuDNN's own limits, found at trace time
            _log.warning("cuDNN attention unavailable for q%s k%s %s (%s); using XLA", q.shape, k.shape, q.dtype, e)
    if kernel == "flash":
        return flash_attention(q, k, v).astype(q.dtype)
    if kernel == "chunked":
        return chunked_attention(q, k, v, mask, cpu_query_chunk(q.shape[0] * q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


def mask_guided_attention(q: jax.Array, k: jax.Array, v: jax.Array, fg_tokens: jax.Array, bg_tokens: jax.Array,
                          region_weight: jax.Array, implementation: Implementation = "auto") -> jax.Array:
    """Two softmaxes over the foreground / background key sets, blended per query by M_r."""

    def attend(tokens: jax.Array) -> jax.Array:
        # log m on the logits is a boolean key mask
        mask = (tokens > 0)[:, None, None, :]
        return dot_product_attention(q, k, v, mask=mask, implementation=implementation).astype(jnp.float32)

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
    implementation: Implementation = "auto"

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
            y = dot_product_attention(q, k, v, is_causal=is_causal, implementation=self.implementation)
        else:
            y = mask_guided_attention(q, k, v, *token_masks, region_weight, self.implementation)
        y = y.reshape(*y.shape[:-2], inner)
        y = nn.Dense(self.out_dim or x.shape[-1], dtype=self.dtype, name=out_name)(y)
        if spatial_shape is not None:
            y = y.reshape(spatial_shape) + residual
        return y
