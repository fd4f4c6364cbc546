"""bgjax models against diffusers / transformers in PyTorch: same random weights, same inputs.

Tolerances: fp32 relative error <= 1e-4 (the issue's bar; measured values are ~1e-7),
bf16 compute against the fp32 reference <= 2e-2. The fp32 checks use fully random weights
(norm scales and biases too, so a swapped or missing leaf shows); the bf16 checks use the
libraries' default initialisation, whose activation scales are those of a trained model
(with every weight drawn at std 0.05, PyTorch's own bf16 autocast is already at 1.8e-2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from transformers import CLIPTextConfig as TorchCLIPConfig
from transformers import CLIPTextModel as TorchCLIP

from bgjax.convert.diffusers_folder import IGNORED, canonical_state
from bgjax.convert.torch_layout import state_dict_to_params
from bgjax.models.components import build, init_params, param_shapes
from bgjax.models.controlnet import controlnet_params_from_unet
from tests.torch_reference import (
    CLIP_SD1_TINY,
    CLIP_SD2_TINY,
    SD1_TINY,
    SD2_TINY,
    VAE_TINY,
    nhwc,
    randomize,
    rel_err,
    state_dict,
)

FP32_TOL, BF16_TOL = 1e-4, 2e-2


def to_bgjax(kind: str, torch_model: torch.nn.Module, config: dict, dtype=jnp.float32):
    module = build(kind, config, dtype)
    params = state_dict_to_params(canonical_state(kind, state_dict(torch_model)), param_shapes(kind, module),
                                  source=kind, ignore=IGNORED.get(kind))
    return module, params


def unet_inputs(cfg: dict, batch: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], size, size, generator=g)
    t = torch.tensor([3, 777][:batch], dtype=torch.long)
    ctx = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)
    return x, t, ctx


@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY, dict(SD1_TINY, in_channels=9)], ids=["sd1", "sd2", "inpaint"])
def test_unet_matches_diffusers(cfg):
    x, t, ctx = unet_inputs(cfg)
    args = (nhwc(x), t.numpy(), ctx.numpy())
    for ref, dtype, tol in ((randomize(TorchUNet(**cfg)), jnp.float32, FP32_TOL),
                            (TorchUNet(**cfg).eval(), jnp.bfloat16, BF16_TOL)):
        with torch.no_grad():
            want = nhwc(ref(x, t, ctx).sample)
        _, params = to_bgjax("unet", ref, dict(ref.config))
        got = build("unet", dict(ref.config), dtype).apply({"params": params}, *args)
        assert got.dtype == jnp.float32  # the output head always runs in fp32
        assert rel_err(got, want) <= tol, dtype


@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
def test_controlnet_and_residuals_match_diffusers(cfg):
    unet = randomize(TorchUNet(**cfg), seed=1)
    cnet = randomize(TorchControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), seed=2)
    x, t, ctx = unet_inputs(cfg)
    cond = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        down, mid = cnet(x, t, ctx, controlnet_cond=cond, conditioning_scale=0.7, return_dict=False)
        want = nhwc(unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample)
    cn_module, cn_params = to_bgjax("controlnet", cnet, dict(cnet.config))
    un_module, un_params = to_bgjax("unet", unet, dict(unet.config))
    got_down, got_mid = cn_module.apply({"params": cn_params}, nhwc(x), t.numpy(), ctx.numpy(), nhwc(cond), 0.7)
    assert len(got_down) == len(down)
    for g_, w_ in zip(got_down, down, strict=True):
        assert rel_err(g_, nhwc(w_)) <= FP32_TOL
    assert rel_err(got_mid, nhwc(mid)) <= FP32_TOL
    got = un_module.apply({"params": un_params}, nhwc(x), t.numpy(), ctx.numpy(), got_down, got_mid)
    assert rel_err(got, want) <= FP32_TOL


def test_controlnet_from_unet_copies_like_diffusers():
    unet = randomize(TorchUNet(**SD1_TINY), seed=3)
    ref = TorchControlNet.from_unet(unet)
    module = build("controlnet", dict(ref.config))
    _, unet_params = to_bgjax("unet", unet, dict(unet.config))
    fresh = init_params("controlnet", module, jax.random.key(0))
    params = controlnet_params_from_unet(unet_params, fresh)
    want = state_dict_to_params(state_dict(ref), param_shapes("controlnet", module), source="ref")
    flat_got = jax.tree_util.tree_leaves_with_path(params)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    for path, v in flat_got:
        name = jax.tree_util.keystr(path)
        if "controlnet_cond_embedding" in name and "conv_out" not in name:
            continue  # randomly initialised in both, by different RNGs
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_want[path]), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_vae_encode_decode_match_diffusers(dtype):
    ref = TorchVAE(**VAE_TINY).eval() if dtype == jnp.bfloat16 else randomize(TorchVAE(**VAE_TINY))
    tol = BF16_TOL if dtype == jnp.bfloat16 else FP32_TOL
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        want_mean, want_logvar, want_dec = nhwc(dist.mean), nhwc(dist.logvar), nhwc(ref.decode(z).sample)
    module, params = to_bgjax("vae", ref, dict(ref.config), dtype)
    mean, logvar = module.apply({"params": params}, nhwc(img), method=module.encode)
    dec = module.apply({"params": params}, nhwc(z), method=module.decode)
    assert rel_err(mean, want_mean) <= tol
    assert rel_err(logvar, want_logvar) <= tol
    assert rel_err(dec, want_dec) <= tol


@pytest.mark.parametrize("cfg", [CLIP_SD1_TINY, CLIP_SD2_TINY], ids=["clip-l", "openclip-h"])
def test_text_encoder_matches_transformers(cfg):
    ids = torch.randint(0, cfg["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(0))
    for ref, dtype, tol in ((randomize(TorchCLIP(TorchCLIPConfig(**cfg))), jnp.float32, FP32_TOL),
                            (TorchCLIP(TorchCLIPConfig(**cfg)).eval(), jnp.bfloat16, BF16_TOL)):
        with torch.no_grad():
            want = ref(ids).last_hidden_state.numpy()
        module, params = to_bgjax("text_encoder", ref, ref.config.to_dict(), dtype)
        assert rel_err(module.apply({"params": params}, ids.numpy()), want) <= tol, dtype


def test_bad_shapes_fail_with_a_clear_message():
    module = build("unet", SD1_TINY)
    with pytest.raises(ValueError, match="divisible by 2"):
        module.init(jax.random.key(0), jnp.zeros((1, 9, 9, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)))
    with pytest.raises(ValueError, match="4 channels"):
        module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)))
