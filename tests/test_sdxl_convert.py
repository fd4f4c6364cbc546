"""SDXL conversion both ways: the folder `StableDiffusionXL(ControlNet)Pipeline.save_pretrained` writes, and the
SDXL base single file (SGM's layout: `conditioner.embedders.0/1`, `label_emb`; each fixture read back with
diffusers' own single-file converters), to a bgjax model and back to a folder diffusers loads key for key."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import load_file, save_file

from bgjax import model_dir
from bgjax.cli import main
from bgjax.convert.ldm import infer_configs
from bgjax.convert.ldm_text import SDXL_OPEN_CLIP_PREFIX
from tests.conftest import tiny_sdxl_pipeline
from tests.ldm_files import sdxl_single_file
from tests.torch_reference import CLIP_G_TINY, CLIP_L_TINY, SDXL_TINY, state_dict

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def _params(model: Path, kind: str) -> dict:
    return dict(jax.tree_util.tree_leaves_with_path(model_dir.load_component(model, kind)[1]))


def assert_same_tensors(pipe, models: dict, kinds) -> None:
    """Each of `pipe`'s components (loaded by diffusers) holds exactly `models`' tensors."""
    for kind in kinds:
        want, got = state_dict(models[kind]), state_dict(getattr(pipe, kind))
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
        assert want.keys() == got.keys(), (kind, sorted(set(want) ^ set(got))[:5])
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{kind}: {key}")


def load_quietly(cls, folder: Path):
    """`cls.from_pretrained(folder)`, failing on any missing or unexpected key of any component."""
    pipe = cls.from_pretrained(folder)
    for name in ("unet", "vae", "controlnet"):
        if (folder / name).is_dir():
            loader = ControlNetModel if name == "controlnet" else type(getattr(pipe, name))
            _, info = loader.from_pretrained(folder / name, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    for name in ("text_encoder", "text_encoder_2"):
        _, info = type(getattr(pipe, name)).from_pretrained(folder / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    return pipe


@pytest.fixture(scope="module")
def converted(tiny_sdxl_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl_model") / "model"
    assert run_cli("convert", tiny_sdxl_dir, "--out", out) == 0
    return out


def test_folder_round_trip_is_identical(converted, tiny_sdxl_models, tmp_path):
    assert sorted(model_dir.components(converted)) == sorted([*PARTS, "controlnet"])
    assert (converted / "tokenizer_2").is_dir()
    assert run_cli("export", converted, "--out", tmp_path / "out") == 0
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLControlNetPipeline"
    pipe = load_quietly(StableDiffusionXLControlNetPipeline, tmp_path / "out")
    assert_same_tensors(pipe, tiny_sdxl_models, [*PARTS, "controlnet"])
    assert pipe.tokenizer_2.pad_token == "!" and pipe.vae.config.scaling_factor == 0.13025


def test_export_without_a_source_index_writes_sdxl_pipelines(converted, tiny_sdxl_models, tmp_path):
    """A model converted from a single file has no model_index.json: the export writes SDXL's own, and
    StableDiffusionXLPipeline loads it (no controlnet: the plain pipeline)."""
    (converted / "model_index.json").rename(tmp_path / "index.json")
    controlnet = converted / "controlnet"
    controlnet.rename(tmp_path / "controlnet")
    manifest = json.loads((converted / "bgjax.json").read_text())
    try:
        model_dir.write_manifest(converted, [k for k in manifest["components"] if k != "controlnet"], "test")
        assert run_cli("export", converted, "--out", tmp_path / "out") == 0
        index = json.loads((tmp_path / "out" / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"]
        pipe = load_quietly(StableDiffusionXLPipeline, tmp_path / "out")
        assert_same_tensors(pipe, tiny_sdxl_models, PARTS)
    finally:
        (tmp_path / "index.json").rename(converted / "model_index.json")
        (tmp_path / "controlnet").rename(controlnet)
        (converted / "bgjax.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------- single files


def _torch(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return {k: torch.from_numpy(v) for k, v in load_file(path).items()}
    return torch.load(path, weights_only=True)["state_dict"]


def _same(got: dict, want: dict, what: str) -> None:
    want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
    got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want))[:5])
    for key, value in want.items():
        torch.testing.assert_close(got[key].float(), value.float(), rtol=0, atol=0, msg=f"{what} {key}")


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl_models, tmp_path_factory) -> Path:
    return sdxl_single_file(tiny_sdxl_models, tmp_path_factory.mktemp("sdxl_file") / "sd_xl.safetensors")


def test_fixture_reads_back_with_diffusers_own_converters(tiny_sdxl_models, sdxl_file):
    """The SDXL fixture is laid out as diffusers' single-file loader expects real SDXL base files."""
    models, ckpt = tiny_sdxl_models, _torch(sdxl_file)
    assert sfu.infer_diffusers_model_type(ckpt) == "xl_base"
    _same(sfu.convert_ldm_unet_checkpoint(ckpt, dict(models["unet"].config)), models["unet"].state_dict(), "unet")
    _same(sfu.convert_ldm_vae_checkpoint(ckpt, dict(models["vae"].config)), models["vae"].state_dict(), "vae")
    # what create_diffusers_clip_model_from_ldm does for SDXL (transformers 5's CLIPTextModel has no text_model.)
    clip = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ckpt).items()}
    _same(clip, models["text_encoder"].state_dict(), "text_encoder")
    open_clip = sfu.convert_open_clip_checkpoint(models["text_encoder_2"], ckpt, prefix=SDXL_OPEN_CLIP_PREFIX)
    _same(open_clip, models["text_encoder_2"].state_dict(), "text_encoder_2")


@pytest.mark.parametrize(("half", "suffix"), [(False, ".safetensors"), (True, ".ckpt")], ids=["fp32", "half"])
def test_single_file_and_folder_import_to_identical_params(tiny_sdxl_models, tiny_sdxl_dir, converted, tmp_path,
                                                           half, suffix):
    path = sdxl_single_file(tiny_sdxl_models, tmp_path / f"sd_xl{suffix}", half=half,
                            extra={"denoiser.sigmas": np.linspace(0.03, 14.6, 1000, dtype=np.float32)})
    out = tmp_path / "model"
    # Head counts are not in the shapes: the tiny model's configs (and tokenizers) come from --config.
    assert run_cli("convert", path, "--out", out, "--config", tiny_sdxl_dir) == 0
    for kind in PARTS:
        got, want = _params(out, kind), _params(converted, kind)
        assert got.keys() == want.keys(), kind
        for key, value in want.items():
            value = np.asarray(value)
            expect = value.astype(np.float16).astype(np.float32) if half else value
            np.testing.assert_array_equal(np.asarray(got[key]), expect, err_msg=f"{kind} {key}")
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["text_encoder"] == "sdxl"
    reasons = {r["key"]: r["reason"] for r in report["ignored"]}
    assert set(reasons) == {"denoiser.sigmas", "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                            "conditioner.embedders.1.model.logit_scale"}, reasons
    assert (out / "tokenizer_2" / "tokenizer_config.json").is_file()


# SDXL's shapes where they decide what is inferred (64-channel heads, a context of both encoders' widths at least
# 1024 wide (SDXL: 2048), 6 time ids beside the pooled embedding), at widths a test can afford.
WIDE = dict(SDXL_TINY, block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2), cross_attention_dim=1024,
            norm_num_groups=32, projection_class_embeddings_input_dim=256 + 6 * 8)
WIDE_L = dict(CLIP_L_TINY, hidden_size=384, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6)
WIDE_G = dict(CLIP_G_TINY, hidden_size=640, intermediate_size=128, num_hidden_layers=2, num_attention_heads=10,
              projection_dim=256)


def test_single_file_converts_without_configs_and_exports_for_diffusers(tiny_sdxl_dir, tmp_path):
    """No --config: every config is inferred from the SDXL file (the added embedding's split, both encoders,
    the VAE's 0.13025), and the export loads in StableDiffusionXLPipeline with the very tensors written."""
    models = tiny_sdxl_pipeline(seed=30, controlnet=False, unet=WIDE, text=WIDE_L, text_2=WIDE_G)
    path = sdxl_single_file(models, tmp_path / "sd_xl.safetensors")
    configs = infer_configs(load_file(path))
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
                "down_block_types", "up_block_types"):
        want = models["unet"].config[key]
        assert configs["unet"][key] == (list(want) if isinstance(want, tuple) else want), key
    assert configs["text_encoder_2"]["projection_dim"] == 256 and configs["vae"]["scaling_factor"] == 0.13025
    out = tmp_path / "model"
    assert run_cli("convert", path, "--out", out, "--tokenizer", tiny_sdxl_dir / "tokenizer",
                   "--tokenizer-2", tiny_sdxl_dir / "tokenizer_2") == 0
    assert run_cli("export", out, "--out", tmp_path / "out") == 0
    pipe = load_quietly(StableDiffusionXLPipeline, tmp_path / "out")
    assert_same_tensors(pipe, models, PARTS)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


@pytest.mark.parametrize(("key", "message"), [
    ("conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight", "SDXL refiner"),
    ("conditioner.embedders.2.weight", "not one of its text encoders"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.extra.weight", "cannot be mapped to a diffusers "
                                                                           "text_encoder_2 weight"),
    ("model.diffusion_model.label_emb.0.1.weight", "cannot be mapped to a diffusers unet weight"),
])
def test_bad_sdxl_keys_are_named(sdxl_file, tiny_sdxl_dir, tmp_path, capsys, key, message):
    state = load_file(sdxl_file)
    state[key] = np.zeros(4, np.float32)
    save_file(state, tmp_path / "bad.safetensors")
    assert run_cli("convert", tmp_path / "bad.safetensors", "--out", tmp_path / "out", "--config", tiny_sdxl_dir) == 2
    err = capsys.readouterr().err
    assert message in err and (key in err or "refiner" in message), err
