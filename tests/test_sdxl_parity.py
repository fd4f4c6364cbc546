"""bgjax's SDXL models against diffusers / transformers in PyTorch: same random weights (every tensor perturbed),
same inputs. fp32 relative error <= 1e-4; bf16 compute against the fp32 reference <= 2e-2 (default
initialisation, as tests/test_parity.py explains). One check at the real SDXL UNet configuration (slow)."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import CLIPTextConfig as TorchCLIPConfig
from transformers import CLIPTextModel as TorchCLIP
from transformers import CLIPTextModelWithProjection as TorchCLIPProjection

from bgjax.convert.torch_layout import _from_torch, torch_key
from bgjax.models.components import build, param_shapes
from bgjax.models.configs import VAEConfig
from bgjax.models.unet import AddedCond
from tests.test_parity import BF16_TOL, FP32_TOL, to_bgjax
from tests.torch_reference import CLIP_G_TINY, CLIP_L_TINY, SDXL, SDXL_TINY, VAE_SDXL_TINY, nhwc, randomize, rel_err


def sdxl_inputs(cfg: dict, batch: int = 2, size: int = 16, seed: int = 0):
    """Latents, timesteps, a context of the UNet's width, the pooled embedding and SDXL's time ids (original
    size, crop top-left, target size: different per example, so a swapped or dropped id shows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], size, size, generator=g)
    t = torch.tensor([3, 777][:batch], dtype=torch.long)
    ctx = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    text_embeds = torch.randn(batch, pooled, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 640.0, 32.0, 0.0, 896.0, 1152.0]])
    return x, t, ctx, {"text_embeds": text_embeds, "time_ids": time_ids[:batch]}


def _added(added: dict) -> AddedCond:
    return AddedCond(added["text_embeds"].numpy(), added["time_ids"].numpy())


def test_unet_matches_diffusers():
    x, t, ctx, added = sdxl_inputs(SDXL_TINY)
    args = (nhwc(x), t.numpy(), ctx.numpy())
    for ref, dtype, tol in ((randomize(TorchUNet(**SDXL_TINY)), jnp.float32, FP32_TOL),
                            (TorchUNet(**SDXL_TINY).eval(), jnp.bfloat16, BF16_TOL)):
        with torch.no_grad():
            want = nhwc(ref(x, t, ctx, added_cond_kwargs=added).sample)
        _, params = to_bgjax("unet", ref, dict(ref.config))
        got = build("unet", dict(ref.config), dtype).apply({"params": params}, *args, added=_added(added))
        print(f"SDXL-structured UNet, {jnp.dtype(dtype).name}: {rel_err(got, want):.2e}")
        assert rel_err(got, want) <= tol
        if dtype == jnp.float32:  # the added embedding moves the output: a model that ignored it would not pass
            swapped = AddedCond(added["text_embeds"].numpy(), added["time_ids"].numpy()[::-1])
            moved = build("unet", dict(ref.config)).apply({"params": params}, *args, added=swapped)
            assert rel_err(moved, want) > 100 * FP32_TOL


def test_controlnet_and_residuals_match_diffusers():
    unet = randomize(TorchUNet(**SDXL_TINY), seed=1)
    cnet = randomize(TorchControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), seed=2)
    assert "add_embedding.linear_1.weight" in cnet.state_dict()
    x, t, ctx, added = sdxl_inputs(SDXL_TINY)
    cond = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        down, mid = cnet(x, t, ctx, controlnet_cond=cond, conditioning_scale=0.7, added_cond_kwargs=added,
                         return_dict=False)
        want = nhwc(unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         added_cond_kwargs=added).sample)
    cn_module, cn_params = to_bgjax("controlnet", cnet, dict(cnet.config))
    un_module, un_params = to_bgjax("unet", unet, dict(unet.config))
    got_down, got_mid = cn_module.apply({"params": cn_params}, nhwc(x), t.numpy(), ctx.numpy(), nhwc(cond), 0.7,
                                        added=_added(added))
    errors = [rel_err(g, nhwc(w)) for g, w in zip(got_down, down, strict=True)] + [rel_err(got_mid, nhwc(mid))]
    got = un_module.apply({"params": un_params}, nhwc(x), t.numpy(), ctx.numpy(), got_down, got_mid,
                          added=_added(added))
    print(f"SDXL ControlNet residuals: max {max(errors):.2e}; UNet with them: {rel_err(got, want):.2e}")
    assert max(errors) <= FP32_TOL and rel_err(got, want) <= FP32_TOL


@pytest.mark.parametrize(("kind", "cls", "cfg"), [
    ("text_encoder", TorchCLIP, CLIP_L_TINY),
    ("text_encoder_2", TorchCLIPProjection, CLIP_G_TINY),
    ("text_encoder_2", TorchCLIPProjection, dict(CLIP_G_TINY, eos_token_id=7)),  # pooled at the first eos id
], ids=["clip-l", "openclip-g", "openclip-g-eos-id"])
def test_text_encoders_match_transformers(kind, cls, cfg):
    ids = torch.randint(3, cfg["vocab_size"] - 1, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[0, 5], ids[1, 40] = cfg["vocab_size"] - 1, cfg["vocab_size"] - 1  # the largest id: pooled here (eos 2)
    ids[0, 9], ids[1, 20] = 7, 7
    ref = randomize(cls(TorchCLIPConfig(**cfg)))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    module, params = to_bgjax(kind, ref, ref.config.to_dict())
    enc = module.apply({"params": params}, ids.numpy(), method=module.encode)
    pooled = out.text_embeds if kind == "text_encoder_2" else out.pooler_output
    errors = {"last": rel_err(enc.last_hidden_state, out.last_hidden_state.numpy()),
              "penultimate": rel_err(enc.penultimate_hidden_state, out.hidden_states[-2].numpy()),
              "pooled": rel_err(enc.pooler_output, pooled.numpy())}
    print(f"{kind} (eos {cfg['eos_token_id']}): {errors}")
    assert max(errors.values()) <= FP32_TOL
    # the penultimate state is not the last one under another name
    assert rel_err(enc.penultimate_hidden_state, out.last_hidden_state.numpy()) > 0.1


def test_vae_reads_its_scaling_factor_and_matches_diffusers():
    ref = randomize(TorchVAE(**VAE_SDXL_TINY))
    assert VAEConfig.from_dict(dict(ref.config)).scaling_factor == 0.13025
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        want = {"mean": nhwc(dist.mean), "logvar": nhwc(dist.logvar), "decode": nhwc(ref.decode(z).sample)}
    module, params = to_bgjax("vae", ref, dict(ref.config))
    mean, logvar = module.apply({"params": params}, nhwc(img), method=module.encode)
    dec = module.apply({"params": params}, nhwc(z), method=module.decode)
    errors = {k: rel_err(v, want[k]) for k, v in (("mean", mean), ("logvar", logvar), ("decode", dec))}
    print(f"SDXL VAE: {errors}")
    assert max(errors.values()) <= FP32_TOL


def test_vae_activations_beyond_fp16_range():
    """SDXL's VAE overflows fp16 (activations past 65504), which is why diffusers upcasts it (`force_upcast`).
    A VAE made to do that here: float16 overflows without the flag, runs in float32 with it (as diffusers
    does), and bfloat16, which has float32's range, decodes finite and close to float32."""
    ref = TorchVAE(**VAE_SDXL_TINY).eval()
    with torch.no_grad():
        ref.decoder.conv_in.weight.mul_(1e5)  # decoder activations of order 1e5
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    _, params = to_bgjax("vae", ref, dict(ref.config))

    def decode(dtype, **config):
        module = build("vae", {**dict(ref.config), **config}, dtype)
        out, seen = module.apply({"params": params}, nhwc(z), method=module.decode, capture_intermediates=True,
                                 mutable=["intermediates"])
        peak = max(float(jnp.max(jnp.abs(a.astype(jnp.float32)))) for a in jax.tree.leaves(seen))
        return np.asarray(out, np.float32), peak

    fp32, peak = decode(jnp.float32)
    assert peak > 65504  # beyond float16's range
    fp16_plain, _ = decode(jnp.float16, force_upcast=False)
    fp16_upcast, _ = decode(jnp.float16)
    bf16, _ = decode(jnp.bfloat16)
    assert not np.isfinite(fp16_plain).all()
    np.testing.assert_array_equal(fp16_upcast, fp32)
    assert np.isfinite(bf16).all() and rel_err(bf16, fp32) <= BF16_TOL, rel_err(bf16, fp32)


def test_missing_or_misshaped_added_conditioning_is_named():
    module = build("unet", SDXL_TINY)
    x, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 7, 80))
    with pytest.raises(ValueError, match="needs the pooled text embedding and the time ids"):
        module.init(jax.random.key(0), x, t, ctx)
    with pytest.raises(ValueError, match="give 71 features; the model's add_embedding takes 72"):
        module.init(jax.random.key(0), x, t, ctx, added=AddedCond(jnp.zeros((1, 23)), jnp.zeros((1, 6))))


def _torch_to_jax(state: dict[str, torch.Tensor], shapes: dict) -> dict:
    """`state` moved leaf by leaf into JAX arrays in bgjax's layout, each torch tensor freed once copied,
    so the two copies of a 10 GB UNet never coexist."""
    out = {}
    for path, want in flatten_dict(shapes).items():
        value = _from_torch(path[-1], state.pop(torch_key(path)).numpy())
        assert value.shape == tuple(want.shape), path
        out[path] = jnp.array(value)
        del value
    assert not state, sorted(state)[:5]
    return unflatten_dict(out)


@pytest.mark.slow
@pytest.mark.big_memory(weights_gb=10.3)
def test_real_sdxl_unet_matches_diffusers():
    """The real SDXL UNet configuration (2.6 G params, 10.3 GB in fp32) at 32 x 32 latents, batch 1: diffusers
    first (weights randomized, output kept), its weights moved tensor by tensor into bgjax's tree, then bgjax."""
    x, t, ctx, added = sdxl_inputs(SDXL, batch=1, size=32)
    ctx = ctx[:, :7]
    ref = randomize(TorchUNet(**SDXL), scale=0.02)
    with torch.no_grad():
        want = nhwc(ref(x, t, ctx, added_cond_kwargs=added).sample)
    state = ref.state_dict()
    del ref
    gc.collect()
    module = build("unet", SDXL)
    params = _torch_to_jax(state, param_shapes("unet", module))
    got = jax.jit(module.apply)({"params": params}, nhwc(x), t.numpy(), ctx.numpy(), added=_added(added))
    err = rel_err(got, want)
    print(f"real SDXL UNet config, fp32, 32x32 latents: relative error {err:.2e}")
    assert err <= FP32_TOL
