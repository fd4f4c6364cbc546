"""The attention paths agree with a direct evaluation of softmax(QK^T/sqrt(d))V, and the
backend choice is the documented one. cuDNN itself only runs on a GPU: `tools/bench.py`
measures its agreement with XLA there (see docs/bench/)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgjax.models import attention
from bgjax.models.attention import cudnn_supports, dot_product_attention


def reference(q, k, v, causal=False):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_matches_direct_formula(impl, causal):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 13, 3, 8))
    k = jax.random.normal(ks[1], (2, 13 if causal else 7, 3, 8))
    v = jax.random.normal(ks[2], k.shape)
    got = dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    want = reference(q, k, v, causal)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_backend_choice():
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    on_gpu = jax.default_backend() == "gpu"
    assert cudnn_supports(q, q) == on_gpu
    assert not cudnn_supports(q.astype(jnp.float32), q.astype(jnp.float32))  # cuDNN fused attention: 16-bit only
    wide = jnp.zeros((1, 16, 1, 512), jnp.bfloat16)  # the VAE's single head: XLA on every backend
    assert not cudnn_supports(wide, wide)
    clip_context = jnp.zeros((1, 77, 2, 64), jnp.bfloat16)  # odd key length: XLA on every backend
    assert not cudnn_supports(q, clip_context)


def test_forced_implementation_is_validated():
    with pytest.raises(ValueError, match="auto, xla or cudnn"):
        attention.set_attention_implementation("flash")
