"""The paper's method: mask-guided attention, PG masking, the combined denoiser, prompts, identifiers."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bgjax.method.conditions import product_condition, reference_condition
from bgjax.method.config import MethodConfig
from bgjax.method.denoiser import Denoiser
from bgjax.method.prompts import CategoryVocabulary, PromptBuilder, embed_with_identifiers, init_identifiers
from bgjax.models.attention import Attention
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from bgjax.models.components import build, init_params
from bgjax.models.controlnet import controlnet_params_from_unet
from bgjax.models.region import Region, area_resize
from bgjax.models.text_encoder import load_tokenizer
from bgjax.models.unet import BasicTransformerBlock
from tests.torch_reference import SD1_TINY

CG_CONFIG = dict(SD1_TINY, conditioning_embedding_out_channels=(8, 16))


@pytest.mark.parametrize(("src", "dst"), [((64, 64), (8, 8)), ((37, 53), (8, 5)), ((100, 30), (13, 7)),
                                          ((512, 384), (16, 12)), ((5, 5), (4, 3))])
def test_area_resize_matches_independent_references(src, dst):
    mask = np.random.default_rng(0).random(src).astype(np.float32)
    got = np.asarray(area_resize(jnp.asarray(mask)[None], *dst))[0]
    # Exact area averaging by supersampling: blow every pixel up to a dst_h x dst_w block, then
    # average src_h x src_w blocks; each output pixel covers exactly its share of the input.
    fine = np.repeat(np.repeat(mask.astype(np.float64), dst[0], 0), dst[1], 1)
    want = fine.reshape(dst[0], src[0], dst[1], src[1]).mean(axis=(1, 3))
    np.testing.assert_allclose(got, want, atol=1e-5)
    if src[0] % dst[0] == 0 and src[1] % dst[1] == 0:  # PIL's box filter is exact area at integer ratios
        pil = np.asarray(Image.fromarray(mask, mode="F").resize(dst[::-1], Image.Resampling.BOX))
        np.testing.assert_allclose(got, pil, atol=1e-5)


def _random_attention_inputs(seed=0, tokens=16, length=9):
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (2, tokens, 16))
    ctx = jax.random.normal(ks[1], (2, length, 12))
    fg = np.zeros((2, length), np.float32)
    bg = np.zeros((2, length), np.float32)
    fg[:, [0, 1, 2, 3, 8]] = 1  # BOS, three foreground tokens, EOS
    bg[:, [0, 4, 5, 6, 7, 8]] = 1  # BOS, four background tokens, EOS
    m_r = (jax.random.uniform(ks[2], (2, tokens, 1)) > 0.5).astype(jnp.float32)
    return x, ctx, fg, bg, m_r


def test_mask_guided_attention_equals_the_formula():
    x, ctx, fg, bg, m_r = _random_attention_inputs()
    m_r = m_r.at[:, :3].set(0.3)  # soft values too: the blend is linear in M_r
    attn = Attention(heads=2, dim_head=4, out_dim=16)
    params = attn.init(jax.random.key(1), x, ctx)["params"]
    got = attn.apply({"params": params}, x, ctx, token_masks=(fg, bg), region_weight=m_r)

    p = jax.tree_util.tree_map(np.asarray, params)
    q = (np.asarray(x) @ p["to_q"]["kernel"]).reshape(2, -1, 2, 4)
    k = (np.asarray(ctx) @ p["to_k"]["kernel"]).reshape(2, -1, 2, 4)
    v = (np.asarray(ctx) @ p["to_v"]["kernel"]).reshape(2, -1, 2, 4)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    with np.errstate(divide="ignore"):

        def softmax_attend(m):
            z = logits + np.log(m)[:, None, None, :]
            w = np.exp(z - z.max(-1, keepdims=True))
            return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)

        y = np.asarray(m_r)[..., None] * softmax_attend(fg) + (1 - np.asarray(m_r)[..., None]) * softmax_attend(bg)
    want = y.reshape(2, -1, 8) @ p["to_out.0"]["kernel"] + p["to_out.0"]["bias"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_mask_guided_attention_separates_product_and_background():
    x, ctx, fg, bg, m_r = _random_attention_inputs(seed=3)
    attn = Attention(heads=2, dim_head=4, out_dim=16)
    params = attn.init(jax.random.key(1), x, ctx)["params"]

    def run(c):
        return np.asarray(attn.apply({"params": params}, x, c, token_masks=(fg, bg), region_weight=m_r))

    base = run(ctx)
    product = np.asarray(m_r[..., 0]) > 0.5
    new_bg = run(ctx.at[:, 4:8].add(3.0))  # only tokens of P_bg alone change
    new_fg = run(ctx.at[:, 1:4].add(3.0))  # only tokens of P_fg alone change
    np.testing.assert_array_equal(new_bg[product], base[product])
    np.testing.assert_array_equal(new_fg[~product], base[~product])
    assert np.abs(new_bg[~product] - base[~product]).max() > 1e-3  # and the other side does react
    assert np.abs(new_fg[product] - base[product]).max() > 1e-3


def test_pg_cross_attention_output_is_zero_at_product_positions():
    x, ctx, fg, bg, _ = _random_attention_inputs(seed=4)
    mask = np.zeros((2, 4, 4), np.float32)
    mask[:, 1:3, 1:4] = 1.0
    region = Region(jnp.asarray(mask), jnp.asarray(fg), jnp.asarray(bg))
    m_r = jnp.asarray(mask.reshape(2, 16, 1))
    block = BasicTransformerBlock(heads=2, dim_head=8, region_mode="mask_output")
    params = block.init(jax.random.key(0), x, ctx, region, m_r)["params"]
    base = np.asarray(block.apply({"params": params}, x, ctx, region, m_r))
    other = np.asarray(block.apply({"params": params}, x, ctx * 2.0 + 1.0, region, m_r))
    product = mask.reshape(2, 16) > 0
    # The context reaches the block only through attn2; at product positions its output is 0.
    np.testing.assert_array_equal(other[product], base[product])
    assert np.abs(other[~product] - base[~product]).max() > 1e-3


@pytest.fixture(scope="module")
def method_models():
    unet = build("unet", CG_CONFIG)
    cg, pg = build("cg", CG_CONFIG), build("pg", CG_CONFIG, mask_residuals=True)
    unet_params = init_params("unet", unet, jax.random.key(0))
    params = {"unet": unet_params,
              "cg": controlnet_params_from_unet(unet_params, init_params("cg", cg, jax.random.key(1))),
              "pg": controlnet_params_from_unet(unet_params, init_params("pg", pg, jax.random.key(2)))}
    return Denoiser(unet, cg, pg), params


def _inputs(seed: int, batch: int = 2):
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, 32, 32), np.float32)
    mask[:, 8 + seed % 4: 20, 10:24 + seed % 3] = 1.0
    fg = np.zeros((batch, 8), np.float32)
    bg = np.zeros((batch, 8), np.float32)
    fg[:, :4], bg[:, 3:] = 1, 1
    return dict(latents=rng.standard_normal((batch, 16, 16, 4)).astype(np.float32),
                timesteps=np.array([10, 700][:batch]),
                context=rng.standard_normal((batch, 8, 32)).astype(np.float32),
                region=Region(mask, fg, bg),
                cg_cond=rng.standard_normal((batch, 32, 32, 3)).astype(np.float32),
                pg_cond=rng.standard_normal((batch, 32, 32, 3)).astype(np.float32))


def test_fresh_branches_leave_the_unet_unchanged_bit_for_bit(method_models):
    denoiser, params = method_models
    x = _inputs(0)
    alone = Denoiser(denoiser.unet)(params, **x)
    both = denoiser(params, **x, lambda_cg=0.7, lambda_pg=1.3)
    np.testing.assert_array_equal(np.asarray(both), np.asarray(alone))


def test_new_masks_prompts_and_references_do_not_recompile(method_models):
    denoiser, params = method_models
    traces = []

    @jax.jit
    def step(params, inputs, lambda_cg, lambda_pg):
        traces.append(1)
        return denoiser(params, **inputs, lambda_cg=lambda_cg, lambda_pg=lambda_pg)

    for seed in range(3):
        step(params, _inputs(seed), 1.0 - 0.1 * seed, 0.5 + seed)
    assert len(traces) == 1


def test_identifiers_are_written_at_their_positions():
    table = jnp.arange(12.0).reshape(3, 4) + 100
    emb = jnp.zeros((10, 4))
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    out = embed_with_identifiers(emb, ids, jnp.array([1, -1]), table, jnp.array([2, 0]))
    np.testing.assert_array_equal(out[0, 1], table[2])
    np.testing.assert_array_equal(out[0, [0, 2]], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)  # no identifier position: untouched
    np.testing.assert_array_equal(init_identifiers(jnp.eye(5), 3, 2), np.stack([np.eye(5)[3]] * 2))


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return PromptBuilder(load_tokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("tok"))), MethodConfig())


def _span_text(builder, prompt, span):
    tok = builder.tokenizer
    ids = [int(i) for i, s in zip(prompt.input_ids, span, strict=True) if s and i not in builder.special_ids]
    return tok.decode(ids).replace(" ", "")  # CLIP lower-cases; compare without spaces


@pytest.mark.parametrize("category", ["rice cooker", "electric rice cooker with steamer", "电饭煲", "café crème"])
def test_prompt_spans_follow_the_text(builder, category):
    p = builder(category)
    assert _span_text(builder, p, p.fg_tokens) == f"a photo of {category},".replace(" ", "")
    assert _span_text(builder, p, p.bg_tokens) == "in the background of *".replace(" ", "")
    assert p.fg_tokens[0] == p.bg_tokens[0] == 1  # BOS in both
    assert p.fg_tokens[-1] == p.bg_tokens[-1] == 1  # padding in both
    assert builder.tokenizer.decode([int(p.input_ids[p.identifier_index])]).strip() == "*"


def test_long_prompts_are_truncated_with_a_warning_and_spans_stay_right(builder, caplog):
    with caplog.at_level(logging.WARNING):
        p = builder("x" * 60)  # "A photo of " + 60 + ", in the background of *" > 77 tokens
    assert "truncated to 77" in caplog.text
    assert len(p.input_ids) == 77 and p.input_ids[-1] == builder.tokenizer.eos_token_id
    # The tiny tokenizer has one token per character: BOS, 69 of P_fg, then P_bg cut after 6 + EOS.
    assert _span_text(builder, p, p.fg_tokens) == "aphotoof" + "x" * 60 + ","
    assert _span_text(builder, p, p.bg_tokens) == "intheb"
    assert p.fg_tokens.sum() == 69 + 2 and p.bg_tokens.sum() == 6 + 2
    assert p.identifier_index == -1  # {D} fell off the end


def test_bad_inputs_are_named(builder):
    image = np.zeros((16, 16, 3), np.float32)
    with pytest.raises(ValueError, match=r"product: mask is \(8, 8\) but its image is \(16, 16\)"):
        product_condition(image, np.ones((8, 8)))
    with pytest.raises(ValueError, match="product: mask marks no product pixels"):
        product_condition(image, np.zeros((16, 16)))
    with pytest.raises(ValueError, match="category: must be a non-empty name"):
        builder("  ")
    with pytest.raises(ValueError, match="reference: a reference image needs its product mask"):
        reference_condition(image, None)
    with pytest.raises(KeyError, match="unknown category 'kettle'; the model knows: rice cooker, lamp"):
        CategoryVocabulary(["rice cooker", "lamp"]).id("kettle")
    cond, mask = product_condition(image + 0.5, np.pad(np.ones((4, 4)), 6))
    assert cond[0, 0].tolist() == [0, 0, 0] and cond[8, 8].tolist() == [0.5] * 3 and mask.sum() == 16
