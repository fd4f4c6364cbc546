"""LDM single-file <-> diffusers key mapping, checked against diffusers' own converters."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu

from bgjax.convert.ldm import (
    diffusers_to_ldm,
    infer_configs,
    split_ldm_checkpoint,
)
from bgjax.fileio import CheckpointError

# SD-1 style: conv proj_in, 8 heads, CLIP (768-d) context; attention only on the first level.
UNET_SD1 = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
# SD-2 style: linear proj_in, 64-channel heads, OpenCLIP (1024-d) context, 2 transformer layers.
UNET_SD2 = dict(sample_size=8, block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=1024, attention_head_dim=[1, 2, 2], use_linear_projection=True,
                transformer_layers_per_block=2)
VAE = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        g = got[key].numpy() if isinstance(got[key], torch.Tensor) else got[key]
        assert g.shape == value.shape, key
        np.testing.assert_array_equal(g, value, err_msg=key)


def _text_model(act: str = "quick_gelu") -> transformers.CLIPTextModel:
    torch.manual_seed(2)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, hidden_act=act))


def _text_state_of(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # transformers >= 5.6 saves CLIPTextModel without the `text_model.` prefix; the mapping uses it.
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def _text_state(model: transformers.CLIPTextModel) -> dict[str, np.ndarray]:
    return _text_state_of(_numpy(model))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(UNET_SD1 if request.param == "sd1" else UNET_SD2))
    vae = AutoencoderKL(**VAE)
    text = _text_model()
    return types.SimpleNamespace(
        unet=_numpy(unet), unet_config=dict(unet.config), vae=_numpy(vae), vae_config=dict(vae.config),
        text=_text_state(text), text_model=text)


@pytest.fixture(scope="module")
def ldm(models):
    return diffusers_to_ldm(models.unet, models.vae, models.text, models.unet_config, models.vae_config)


def test_export_layout(ldm):
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in ldm)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "model.diffusion_model.input_blocks.0.0.weight" in ldm
    assert "model.diffusion_model.out.2.weight" in ldm


def test_diffusers_reads_our_export(models, ldm):
    _assert_same(sfu.convert_ldm_unet_checkpoint(_torch(ldm), models.unet_config), models.unet)
    _assert_same(sfu.convert_ldm_vae_checkpoint(_torch(ldm), models.vae_config), models.vae)
    _assert_same(sfu.convert_ldm_clip_checkpoint(_torch(ldm)), models.text)


@pytest.mark.parametrize("given_configs", [False, True])
def test_split_inverts_export(models, ldm, given_configs):
    configs = {"unet": models.unet_config, "vae": models.vae_config} if given_configs else None
    split = split_ldm_checkpoint(ldm, configs)
    assert set(split.components) == {"unet", "vae", "text_encoder"}
    assert split.text_encoder_kind == "clip"
    assert split.ignored == []
    _assert_same(split.components["unet"], models.unet)
    _assert_same(split.components["vae"], models.vae)
    _assert_same(split.components["text_encoder"], models.text)


def test_inferred_configs_build_the_models(models, ldm):
    configs = infer_configs(ldm)
    unet_cfg = configs["unet"]
    for field in ("block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
                  "down_block_types", "up_block_types", "in_channels", "out_channels", "attention_head_dim",
                  "transformer_layers_per_block"):
        want = models.unet_config[field]
        assert unet_cfg[field] == (list(want) if isinstance(want, tuple) else want), field
    for field in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"):
        want = models.vae_config[field]
        assert configs["vae"][field] == (list(want) if isinstance(want, tuple) else want), field
    text_cfg = configs["text_encoder"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings"):
        assert text_cfg[field] == TEXT[field], field
    assert text_cfg["hidden_act"] == "quick_gelu"

    # The inferred configs (with the tiny models' group count) load the split weights strictly.
    split = split_ldm_checkpoint(ldm)
    unet = UNet2DConditionModel(**{**unet_cfg, "norm_num_groups": 8, "sample_size": 8})
    unet.load_state_dict(_torch(split.components["unet"]), strict=True)
    vae = AutoencoderKL(**{**configs["vae"], "norm_num_groups": 8})
    vae.load_state_dict(_torch(split.components["vae"]), strict=True)


def test_non_weights_are_reported(ldm):
    extra = {
        "alphas_cumprod": np.zeros(10), "betas": np.zeros(10), "posterior_mean_coef1": np.zeros(10),
        "sqrt_recipm1_alphas_cumprod": np.zeros(10), "log_one_minus_alphas_cumprod": np.zeros(10),
        "lvlb_weights": np.zeros(10), "model_ema.num_updates": np.zeros(()), "model_ema.decay": np.zeros(()),
        "model_ema.diffusion_modelinput_blocks00weight": np.zeros((1,)),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(16)[None],
        "first_stage_model.loss.logvar": np.zeros(()),
    }
    split = split_ldm_checkpoint({**ldm, **extra})
    ignored = dict(split.ignored)
    assert set(ignored) == set(extra)
    assert all(ignored.values())
    assert "EMA" in ignored["model_ema.num_updates"]
    lora = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"
    with pytest.raises(CheckpointError, match=re.escape(repr(lora))):
        split_ldm_checkpoint({**ldm, lora: np.zeros((4, 4))})
    assert lora in dict(split_ldm_checkpoint({**ldm, lora: np.zeros((4, 4))}, allow_extra_keys=True).ignored)


def test_older_clip_layout_without_text_model(models, ldm):
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in ldm.items()}
    split = split_ldm_checkpoint(old)
    _assert_same(split.components["text_encoder"], models.text)
    assert infer_configs(old)["text_encoder"]["num_hidden_layers"] == TEXT["num_hidden_layers"]


@pytest.mark.parametrize("key", [
    "model.diffusion_model.input_blocks.1.0.bogus.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.output_blocks.0.1.proj_in.weight",  # level without attention
    "first_stage_model.encoder.down.7.block.0.conv1.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc3.weight",
])
@pytest.mark.parametrize("given_configs", [False, True])
def test_unmappable_key_is_named(ldm, key, given_configs):
    configs = infer_configs(ldm) if given_configs else None
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        split_ldm_checkpoint({**ldm, key: np.zeros((4, 4))}, configs)


def test_export_rejects_unknown_diffusers_key(models):
    unet = {**models.unet, "class_embedding.linear_1.weight": np.zeros((4, 4))}
    with pytest.raises(CheckpointError, match="class_embedding"):
        diffusers_to_ldm(unet, models.vae, models.text, models.unet_config, models.vae_config)


# ---------------------------------------------------------------------------------------- OpenCLIP (SD-2)


def _open_clip_layout(text: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The SD-2 `cond_stage_model.model.` dict of a CLIPTextModel, plus one extra (last) resblock."""
    p, width = "cond_stage_model.model.", TEXT["hidden_size"]
    out = {
        p + "token_embedding.weight": text["text_model.embeddings.token_embedding.weight"],
        p + "positional_embedding": text["text_model.embeddings.position_embedding.weight"],
        p + "ln_final.weight": text["text_model.final_layer_norm.weight"],
        p + "ln_final.bias": text["text_model.final_layer_norm.bias"],
        p + "text_projection": rng.standard_normal((width, 32)).astype(np.float32),
        p + "logit_scale": np.array(4.6, np.float32),
    }
    layers = TEXT["num_hidden_layers"]
    for i in range(layers + 1):
        src, dst = f"text_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            if i == layers:  # the block diffusers drops
                shapes = {"attn.in_proj": (3 * width, width), "attn.out_proj": (width, width),
                          "ln_1": (width,), "ln_2": (width,), "mlp.c_fc": (TEXT["intermediate_size"], width),
                          "mlp.c_proj": (width, TEXT["intermediate_size"])}
                for name, shape in shapes.items():
                    shape = shape if param == "weight" or len(shape) == 1 else shape[:1]
                    key = dst + ("attn.in_proj_" + param if name == "attn.in_proj" else f"{name}.{param}")
                    out[key] = rng.standard_normal(shape).astype(np.float32)
                continue
            out[dst + "attn.in_proj_" + param] = np.concatenate(
                [text[f"{src}self_attn.{n}_proj.{param}"] for n in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{theirs}.{param}"] = text[f"{src}{ours}.{param}"]
    return out


def test_open_clip_against_diffusers():
    text = _text_state(_text_model("gelu"))
    state = _open_clip_layout(text, np.random.default_rng(0))
    split = split_ldm_checkpoint(state)
    assert split.text_encoder_kind == "open_clip"
    _assert_same(split.components["text_encoder"], text)

    last = TEXT["num_hidden_layers"]
    ignored = dict(split.ignored)
    assert {k for k in ignored if ".resblocks." in k} == {k for k in state if f".resblocks.{last}." in k}
    assert "penultimate" in ignored[f"cond_stage_model.model.transformer.resblocks.{last}.ln_1.weight"]
    assert set(ignored) - {k for k in state if ".resblocks." in k} == {
        "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}

    # diffusers only drops a hard-coded `resblocks.23` (ViT-H), so its output keeps our extra block.
    text_model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=TEXT["hidden_size"]))
    ref = sfu.convert_open_clip_checkpoint(text_model, _torch(state))
    ref = {k: v for k, v in ref.items() if f".layers.{last}." not in k}
    _assert_same(ref, text)

    cfg = infer_configs(state)["text_encoder"]
    assert cfg["num_hidden_layers"] == last
    # diffusers' own script writes the blocks diffusers kept and no projection head: none is dropped.
    kept = {k: v for k, v in state.items() if not k.endswith(("text_projection", "logit_scale"))}
    assert infer_configs(kept)["text_encoder"]["num_hidden_layers"] == last + 1
    assert cfg["hidden_act"] == "gelu"
    assert cfg["projection_dim"] == 32
    assert cfg["hidden_size"] == TEXT["hidden_size"]


def test_open_clip_unmappable_key_is_named():
    state = _open_clip_layout(_text_state(_text_model("gelu")), np.random.default_rng(0))
    key = "cond_stage_model.model.transformer.resblocks.0.mlp.c_gate.weight"
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        split_ldm_checkpoint({**state, key: np.zeros((4, 4))})


# ---------------------------------------------------------------------------------------- full-size layouts
# Real SD shapes on the meta device / as zero-stride numpy views: keys and shapes only, no memory.

SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8)
SD21_UNET = dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                 attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77)
OPEN_CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")


def _shapes(module: torch.nn.Module) -> dict[str, np.ndarray]:
    zero = np.zeros((), np.float32)
    return {k: np.broadcast_to(zero, v.shape) for k, v in module.state_dict().items()}


def _meta(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, device="meta") for k, v in state.items()}


def _assert_same_shapes(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert tuple(got[key].shape) == tuple(value.shape), key


def test_sd15_full_size_layout():
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD_VAE)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L))
    u, v, t = _shapes(unet), _shapes(vae), _text_state_of(_shapes(text))
    ldm = diffusers_to_ldm(u, v, t, dict(unet.config), dict(vae.config))
    assert len(ldm) == 686 + 248 + 196
    assert sfu.infer_diffusers_model_type(ldm) == "v1"
    for key in ("input_blocks.3.0.op.weight", "input_blocks.11.0.out_layers.3.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "output_blocks.8.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.proj_in.weight"):
        assert "model.diffusion_model." + key in ldm, key
    _assert_same_shapes(sfu.convert_ldm_unet_checkpoint(_meta(ldm), dict(unet.config)), u)
    _assert_same_shapes(sfu.convert_ldm_vae_checkpoint(_meta(ldm), dict(vae.config)), v)

    configs = infer_configs(ldm)
    for field, want in SD15_UNET.items():
        if field != "sample_size":
            assert configs["unet"][field] == (list(want) if isinstance(want, tuple) else want), field
    assert configs["unet"]["down_block_types"] == list(unet.config.down_block_types)
    assert configs["unet"]["up_block_types"] == list(unet.config.up_block_types)
    assert configs["vae"]["block_out_channels"] == list(SD_VAE["block_out_channels"])
    assert {k: configs["text_encoder"][k] for k in CLIP_L} == CLIP_L
    split = split_ldm_checkpoint(ldm)
    _assert_same_shapes(split.components["unet"], u)
    _assert_same_shapes(split.components["vae"], v)
    _assert_same_shapes(split.components["text_encoder"], t)


def test_sd21_full_size_layout():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**OPEN_CLIP_H))
    u, t = _shapes(unet), _text_state_of(_shapes(text))
    ldm = diffusers_to_ldm(u, {}, {}, dict(unet.config), SD_VAE)
    # The real SD-2 text tower: 24 resblocks, of which diffusers keeps 23.
    p, width = "cond_stage_model.model.", OPEN_CLIP_H["hidden_size"]
    zero = np.zeros((), np.float32)
    ldm.update({p + "token_embedding.weight": np.broadcast_to(zero, (49408, width)),
                p + "positional_embedding": np.broadcast_to(zero, (77, width)),
                p + "ln_final.weight": np.broadcast_to(zero, (width,)),
                p + "ln_final.bias": np.broadcast_to(zero, (width,)),
                p + "text_projection": np.broadcast_to(zero, (width, width)),
                p + "logit_scale": np.broadcast_to(zero, ())})
    for i in range(24):
        b = f"{p}transformer.resblocks.{i}."
        for name, shape in (("attn.in_proj_weight", (3 * width, width)), ("attn.in_proj_bias", (3 * width,)),
                            ("attn.out_proj.weight", (width, width)), ("attn.out_proj.bias", (width,)),
                            ("ln_1.weight", (width,)), ("ln_1.bias", (width,)), ("ln_2.weight", (width,)),
                            ("ln_2.bias", (width,)), ("mlp.c_fc.weight", (4 * width, width)),
                            ("mlp.c_fc.bias", (4 * width,)), ("mlp.c_proj.weight", (width, 4 * width)),
                            ("mlp.c_proj.bias", (width,))):
            ldm[b + name] = np.broadcast_to(zero, shape)

    configs = infer_configs(ldm)
    assert configs["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert configs["unet"]["use_linear_projection"] is True
    assert configs["unet"]["cross_attention_dim"] == 1024
    assert {k: configs["text_encoder"][k] for k in OPEN_CLIP_H} == OPEN_CLIP_H
    split = split_ldm_checkpoint(ldm)
    _assert_same_shapes(split.components["unet"], u)
    _assert_same_shapes(split.components["text_encoder"], t)
    assert len([k for k, _ in split.ignored if ".resblocks.23." in k]) == 12
    # Here diffusers' hard-coded `resblocks.23` drop matches, so its output is the full reference.
    ref = sfu.convert_open_clip_checkpoint(text, _meta(ldm))
    _assert_same_shapes(ref, t)
