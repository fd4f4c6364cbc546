"""The attention kernels agree with a direct evaluation of softmax(QK^T/sqrt(d))V and with each other,
the kernel choice is the documented one, and it reaches every attention layer as a module field.

The Pallas flash kernel runs here in Pallas' TPU interpret mode (the TPU program, simulated on the CPU);
cuDNN runs only on a GPU: `tools/bench.py` measures its agreement with XLA there (docs/bench/). What the
CPU can check of the cuDNN path, the padding of odd key lengths, is checked through XLA below."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from bgjax.models import attention
from bgjax.models.attention import (
    check_implementation,
    choose,
    cudnn_keys,
    cudnn_supports,
    dot_product_attention,
    flash_attention,
)
from bgjax.models.components import build, example_inputs, param_shapes
from tests.torch_reference import SD1_TINY


def reference(q, k, v, causal=False, mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


def _qkv(shape, kv_len=None, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    kv_shape = (shape[0], kv_len or shape[1], *shape[2:])
    return jax.random.normal(ks[0], shape), jax.random.normal(ks[1], kv_shape), jax.random.normal(ks[2], kv_shape)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["auto", "xla", "flash"])
def test_matches_direct_formula(impl, causal):
    q, k, v = _qkv((2, 13, 3, 8), None if causal else 7)
    got = dot_product_attention(q, k, v, is_causal=causal, implementation=impl)  # 13 tokens: XLA for each
    assert _rel(got, reference(q, k, v, causal)) < 1e-5


def test_key_mask_matches_direct_formula():
    q, k, v = _qkv((2, 16, 2, 8), 7)
    mask = np.zeros((2, 1, 1, 7), bool)
    mask[0, ..., :3], mask[1, ..., 2:6] = True, True
    assert _rel(dot_product_attention(q, k, v, mask=jnp.asarray(mask)), reference(q, k, v, mask=mask)) < 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_keys_leave_the_result_unchanged(masked):
    """cuDNN gets 77-token contexts padded to 78 and key masks as gathered keys with their count: with those
    lengths as its padding mask (XLA takes the same lengths) the result must equal the masked, unpadded
    attention. Catches a pad or a gathered-out key that is not cut off (an unmasked pad pulls every row
    towards the zero key), and a gather that does not keep each row's own keys."""
    q, k, v = _qkv((2, 32, 4, 8), 77)
    mask = np.random.default_rng(0).random((2, 1, 1, 77)) < 0.5
    mask[0, ..., 0] = mask[1, ..., 0] = True
    mask = jnp.asarray(mask) if masked else None
    ck, cv, lengths = cudnn_keys(k, v, mask)
    assert ck.shape[1] == 78 and lengths.shape == (2,)
    assert list(np.asarray(lengths)) == ([int(m.sum()) for m in np.asarray(mask)] if masked else [77, 77])
    got = jax.nn.dot_product_attention(q, ck, cv, key_value_seq_lengths=lengths, implementation="xla")
    assert _rel(got, reference(q, k, v, mask=mask)) < 1e-5
    unmasked = jax.nn.dot_product_attention(q, ck, cv, implementation="xla")
    assert _rel(unmasked, reference(q, k, v, mask=mask)) > 1e-3  # the pad and the moved keys do matter


@pytest.mark.parametrize(("tokens", "heads"), [(1024, 8), pytest.param(4096, 2, marks=pytest.mark.slow)],
                         ids=["1024x8h40", "4096x2h40"])
def test_flash_kernel_matches_xla_forward_and_gradients(tokens, heads):
    """The Pallas TPU flash kernel in interpret mode at SD-1.5's head width (40) and its self-attention
    lengths (32 x 32 and 64 x 64 latents): outputs and the gradients of q, k, v as XLA's, fp32."""
    q, k, v = _qkv((1, tokens, heads, 40), seed=1)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * cotangent)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    with pltpu.force_tpu_interpret_mode():
        out = flash_attention(q, k, v)
        grads = jax.grad(lambda *a: loss(flash_attention, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    assert _rel(out, xla(q, k, v)) < 1e-5
    for name, got, ref in zip("qkv", grads, want, strict=True):
        assert _rel(got, ref) < 1e-5, name


def test_kernel_choice():
    on_cpu = jax.default_backend() == "cpu"
    self_attn = jnp.zeros((1, 1024, 8, 40))
    context = jnp.zeros((1, 77, 8, 40))
    if on_cpu:
        assert choose("auto", self_attn, self_attn) == "xla"  # flash is for TPUs, cuDNN for GPUs
        assert not cudnn_supports(self_attn.astype(jnp.bfloat16), self_attn.astype(jnp.bfloat16))
    assert choose("xla", self_attn, self_attn) == "xla"
    assert choose("flash", self_attn, self_attn) == "flash"
    assert choose("flash", self_attn, context) == "xla"  # cross-attention: XLA
    assert choose("flash", self_attn, self_attn, masked=True) == "xla"  # mask-guided: XLA
    assert choose("flash", jnp.zeros((1, 100, 8, 40)), jnp.zeros((1, 100, 8, 40))) == "xla"  # not tiled by 128
    bf16 = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    assert not cudnn_supports(bf16.astype(jnp.float32), bf16.astype(jnp.float32))  # 16-bit only
    wide = jnp.zeros((1, 16, 1, 512), jnp.bfloat16)  # the VAE's single head: never cuDNN
    assert not cudnn_supports(wide, wide)
    with pytest.raises(ValueError, match="auto, xla, cudnn, flash"):
        check_implementation("pallas")


def test_the_module_field_reaches_every_attention_layer(monkeypatch):
    """attention="flash" is a field of the UNet, read by every attention layer: the kernel runs in each
    self-attention layer whose length it tiles (256 tokens at the first level of a tiny UNet: one down and
    two up layers) and XLA in the others (cross-attention, the 64-token mid block); outputs equal the
    XLA-built UNet's (checked on a variant with one such layer: each interpreted kernel compiles slowly)."""
    from bgjax.models.configs import UNetConfig

    def config(up_blocks):
        return UNetConfig.from_dict({**SD1_TINY, "down_block_types": list(SD1_TINY["down_block_types"]),
                                     "up_block_types": up_blocks,
                                     "block_out_channels": list(SD1_TINY["block_out_channels"])})

    context = jax.random.normal(jax.random.key(1), (1, 77, SD1_TINY["cross_attention_dim"]))
    calls = []
    monkeypatch.setattr(attention, "flash_attention", lambda *a: calls.append(a[0].shape) or flash_attention(*a))
    for up_blocks, flash_layers in ((list(SD1_TINY["up_block_types"]), 3), (["UpBlock2D", "UpBlock2D"], 1)):
        modules = {impl: build("unet", config(up_blocks), attention=impl) for impl in ("xla", "flash")}
        rng = np.random.default_rng(0)  # random params from the shapes: a jitted init compiles for a minute
        params = jax.tree.map(lambda s, rng=rng: rng.normal(0, 0.1, s.shape).astype(np.float32),
                              param_shapes("unet", modules["xla"]))
        x, t, _ = example_inputs("unet", modules["xla"], batch=1, latent_size=16)
        x = jax.random.normal(jax.random.key(2), x.shape)

        def run(impl, modules=modules, params=params, x=x, t=t):
            return jax.jit(modules[impl].apply)({"params": params}, x, t, context)

        for impl, want in (("xla", []), ("flash", [(1, 256, 4, 8)] * flash_layers)):
            calls.clear()
            jax.eval_shape(lambda impl=impl, run=run: run(impl))  # traces every layer
            assert calls == want, (up_blocks, impl)
    with pltpu.force_tpu_interpret_mode():
        flash = run("flash")
    assert _rel(flash, run("xla")) < 1e-5
