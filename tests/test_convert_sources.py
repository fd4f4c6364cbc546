"""`bgjax convert` on files written by other tools: transformers 5 tokenizers, single files as the original
releases and diffusers' single-file script lay them out (SD-1 and SD-2, fp32 and --half; each fixture read back
by diffusers' own single-file converters first), wrapped and extended single files, the original ControlNet
layout, and bgjax's own export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bgjax import model_dir
from bgjax.cli import main
from bgjax.convert.diffusers_folder import check_tokenizer, import_diffusers
from bgjax.convert.ldm import _unet_keymap, strip_wrappers
from bgjax.fileio import CheckpointError
from bgjax.method.config import MethodConfig
from bgjax.method.store import load_method, save_method
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from bgjax.models.text_encoder import load_tokenizer
from tests.conftest import save_diffusers_folder
from tests.ldm_files import sd_single_file
from tests.torch_reference import CLIP_SD1_TINY, randomize

# SD's topology (4 levels, 2 layers per block, attention on the first 3), as the single files have it, with
# every width cut to 32.
SD1_UNET = dict(sample_size=8, block_out_channels=(32,) * 4, layers_per_block=2, cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=32)
SD2_UNET = dict(SD1_UNET, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True)
SD_VAE = dict(block_out_channels=(32,) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD1_TEXT = dict(CLIP_SD1_TINY, hidden_size=32, intermediate_size=64)
# A GELU tower of 23 layers (what diffusers keeps of OpenCLIP's 24) makes the script write SD-2's layout.
SD2_TEXT = dict(SD1_TEXT, hidden_act="gelu", num_hidden_layers=23)
CATEGORIES = ["rice cooker", "lamp", "电饭煲"]


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def diffusers_script(folder: Path, out: Path, half: bool) -> Path:
    """The single file diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py writes for a
    diffusers folder: the models as saved there; the text encoder in SD-2's OpenCLIP layout when the script
    recognises SD-2, by the key `text_model.encoder.layers.22.layer_norm2.bias` (a 23-layer tower saved by
    transformers 4), else in SD-1's (so a transformers 5 save of SD-2 comes out in SD-1's names)."""
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    keys = load_file(folder / "text_encoder" / "model.safetensors")
    models = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
              "vae": AutoencoderKL.from_pretrained(folder / "vae"), "text_encoder": text}
    layout = "open_clip" if "text_model.encoder.layers.22.layer_norm2.bias" in keys else "clip"
    return sd_single_file(models, out, layout, half)


def _params(model: Path, kind: str) -> dict:
    return dict(jax.tree_util.tree_leaves_with_path(model_dir.load_component(model, kind)[1]))


def assert_same_params(got: Path, want: Path, kinds, half: bool = False) -> None:
    for kind in kinds:
        g, w = _params(got, kind), _params(want, kind)
        assert g.keys() == w.keys(), kind
        for path, value in w.items():
            value = np.asarray(value)
            expect = value.astype(np.float16).astype(np.float32) if half else value
            np.testing.assert_array_equal(np.asarray(g[path]), expect, err_msg=f"{kind} {path}")


def sd_models(unet: dict, text: dict, seed: int) -> dict[str, torch.nn.Module]:
    return {"unet": randomize(UNet2DConditionModel(**unet), seed), "vae": randomize(AutoencoderKL(**SD_VAE), seed + 1),
            "text_encoder": randomize(CLIPTextModel(CLIPTextConfig(**text)), seed + 2)}


@pytest.fixture(scope="module")
def sd1_models() -> dict[str, torch.nn.Module]:
    models = sd_models(SD1_UNET, SD1_TEXT, 0)
    models["controlnet"] = randomize(ControlNetModel.from_unet(
        models["unet"], conditioning_embedding_out_channels=(8, 16, 16, 32)), 3)
    return models


@pytest.fixture(scope="module")
def sd1(sd1_models, tmp_path_factory) -> tuple[Path, Path]:
    """(the diffusers folder, its conversion)."""
    root = tmp_path_factory.mktemp("sd1")
    folder = save_diffusers_folder(sd1_models, root / "src")
    import_diffusers(folder, root / "model")
    return folder, root / "model"


def _sd2_folder(root: Path, transformers4: bool) -> Path:
    folder = save_diffusers_folder(sd_models(SD2_UNET, SD2_TEXT, 10), root)
    if transformers4:  # the hub's SD-2 folders were saved by transformers 4: keys under `text_model.`
        path = folder / "text_encoder" / "model.safetensors"
        save_file({"text_model." + k: v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=["transformers4", "transformers5"])
def sd2(request, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(f"sd2_{request.param}")
    folder = _sd2_folder(root / "src", request.param == "transformers4")
    import_diffusers(folder, root / "model")
    return folder, root / "model"


# ---------------------------------------------------------------------------------------------- tokenizers


def test_tokenizer_layouts_load_alike(tmp_path):
    classic = write_byte_tokenizer(tmp_path / "classic")
    CLIPTokenizer.from_pretrained(str(classic), local_files_only=True).save_pretrained(tmp_path / "saved")
    # What transformers 5 writes: no vocab.json / merges.txt, so a reader that insists on them fails here.
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    a, b = load_tokenizer(classic), load_tokenizer(tmp_path / "saved")
    for text in ("a rice cooker on a table", "电饭煲", ""):
        ids = a(text, padding="max_length", max_length=77).input_ids
        assert ids == b(text, padding="max_length", max_length=77).input_ids
        assert ids[0] == 512 and 513 in ids
    with pytest.raises(FileNotFoundError, match="needs tokenizer.json, or vocab.json"):
        load_tokenizer(tmp_path)


def test_convert_checks_the_tokenizer(sd1, tmp_path, capsys):
    src = shutil.copytree(sd1[0], tmp_path / "src")
    shutil.rmtree(src / "tokenizer")
    CLIPTokenizer.from_pretrained(str(sd1[0] / "tokenizer")).save_pretrained(src / "tokenizer")
    assert run_cli("convert", src, "--out", tmp_path / "ok") == 0
    assert not (tmp_path / "ok" / "tokenizer" / "vocab.json").exists()
    assert load_tokenizer(tmp_path / "ok" / "tokenizer")("lamp").input_ids == [512, 108, 97, 109, 368, 513]

    (src / "tokenizer" / "tokenizer.json").unlink()  # only tokenizer_config.json left
    assert run_cli("convert", src, "--out", tmp_path / "bad") == 2
    assert "the tokenizer does not load" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="514 tokens, more than the text encoder's 100 embedding rows"):
        check_tokenizer(tmp_path / "ok" / "tokenizer", {"vocab_size": 100}, "tok")


# ---------------------------------------------------------------------------------------------- diffusers' script


def _torch(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return {k: torch.from_numpy(v) for k, v in load_file(path).items()}
    return torch.load(path, weights_only=True)["state_dict"]


def _same(got: dict, want: dict, what: str) -> None:
    want = {k.removeprefix("text_model."): v for k, v in want.items() if not k.endswith("position_ids")}
    got = {k.removeprefix("text_model."): v for k, v in got.items() if not k.endswith("position_ids")}
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want))[:5])
    for key, value in want.items():
        torch.testing.assert_close(got[key].float(), value.float(), rtol=0, atol=0, msg=f"{what} {key}")


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_fixture_files_read_back_with_diffusers_own_converters(sd1_models, tmp_path, layout):
    """The single-file fixtures are laid out as diffusers' single-file loader expects real files: its
    converters (`from_single_file`'s) give back the very weights they were written from."""
    models = dict(sd1_models)
    if layout == "open_clip":
        models["text_encoder"] = randomize(CLIPTextModel(CLIPTextConfig(**SD2_TEXT)), 5)
    path = sd_single_file(models, tmp_path / "sd.ckpt", layout)
    ckpt = _torch(path)
    _same(sfu.convert_ldm_unet_checkpoint(ckpt, dict(models["unet"].config)), models["unet"].state_dict(), "unet")
    _same(sfu.convert_ldm_vae_checkpoint(ckpt, dict(models["vae"].config)), models["vae"].state_dict(), "vae")
    text = (sfu.convert_ldm_clip_checkpoint(ckpt) if layout == "clip"
            else sfu.convert_open_clip_checkpoint(models["text_encoder"], ckpt))
    _same(text, models["text_encoder"].state_dict(), "text_encoder")


@pytest.mark.parametrize(("half", "suffix"), [(False, ".safetensors"), (True, ".ckpt")], ids=["fp32", "half"])
def test_sd1_file_from_diffusers_script(sd1, tmp_path, half, suffix):
    folder, converted = sd1
    single = diffusers_script(folder, tmp_path / f"sd1{suffix}", half)
    out = tmp_path / "model"
    assert run_cli("convert", single, "--out", out, "--tokenizer", folder / "tokenizer") == 0  # no --config
    assert_same_params(out, converted, ("unet", "vae", "text_encoder"), half)
    assert json.loads((out / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 2


def test_sd2_file_from_diffusers_script_keeps_all_23_layers(sd2, tmp_path):
    folder, converted = sd2
    # One precision and file type per text-encoder layout keeps the test short; both of each are covered.
    transformers4 = "text_model." in next(iter(load_file(folder / "text_encoder" / "model.safetensors")))
    half, suffix = (False, ".ckpt") if transformers4 else (True, ".safetensors")
    single = diffusers_script(folder, tmp_path / f"sd2{suffix}", half)
    out = tmp_path / "model"
    assert run_cli("convert", single, "--out", out, "--tokenizer", folder / "tokenizer") == 0  # no --config
    assert_same_params(out, converted, ("unet", "vae", "text_encoder"), half)
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    assert config["num_hidden_layers"] == 23
    report = json.loads((out / "conversion_report.json").read_text())
    # With transformers 4 keys the script writes OpenCLIP's layout; with transformers 5's it writes SD-1's.
    assert report["text_encoder"] == ("open_clip" if transformers4 else "clip")
    assert report["text_layers"] == 23


# ------------------------------------------------------------------------------------------ wrapped / extended files


@pytest.fixture(scope="module")
def sd1_file(sd1, tmp_path_factory) -> Path:
    return diffusers_script(sd1[0], tmp_path_factory.mktemp("sd1_file") / "sd1.safetensors", half=False)


def test_wrapper_prefix_is_stripped_and_reported(sd1, sd1_file, tmp_path, capsys):
    plain = load_file(sd1_file)
    for wrappers in (["module."], ["model."], ["state_dict."], ["module.", "model."]):
        state, stripped = strip_wrappers({"".join(wrappers) + k: v for k, v in plain.items()})
        assert stripped == wrappers and state.keys() == plain.keys()
    assert strip_wrappers(plain)[1] == []  # `model.diffusion_model.` is SD's own prefix, not a wrapper
    wrapped = tmp_path / "wrapped.safetensors"
    save_file({"module." + k: v for k, v in plain.items()}, wrapped)
    out = tmp_path / "model"
    assert run_cli("convert", wrapped, "--out", out, "--tokenizer", sd1[0] / "tokenizer") == 0
    assert "stripped the wrapper prefix 'module.'" in capsys.readouterr().out
    assert json.loads((out / "conversion_report.json").read_text())["wrappers_stripped"] == ["module."]
    assert_same_params(out, sd1[1], ("unet", "vae", "text_encoder"))


def test_keys_outside_sd_are_an_error_unless_allowed(sd1, sd1_file, tmp_path, capsys):
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.ones((4, 32), np.float32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(4.0, np.float32)}
    extended = tmp_path / "with_lora.safetensors"
    save_file({**load_file(sd1_file), **lora}, extended)
    assert run_cli("convert", extended, "--out", tmp_path / "refused") == 2
    err = capsys.readouterr().err
    assert "2 key(s) outside Stable Diffusion's" in err and repr(sorted(lora)[0]) in err
    assert "--allow-extra-keys" in err
    assert run_cli("convert", extended, "--out", tmp_path / "model", "--allow-extra-keys") == 0
    assert "ignored 2 key(s): extra key" in capsys.readouterr().out
    ignored = {e["key"] for e in json.loads((tmp_path / "model" / "conversion_report.json").read_text())["ignored"]}
    assert set(lora) <= ignored


def _original_controlnet_keys(controlnet: ControlNetModel) -> dict[str, np.ndarray]:
    """A diffusers ControlNet in the original release's `control_model.*` names: the encoder half named as
    diffusers' script names the UNet's, the ControlNet-only parts as in lllyasviel/ControlNet's cldm.py."""
    state = {k: v.detach().numpy() for k, v in controlnet.state_dict().items()}
    keymap = _unet_keymap({**controlnet.config, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3})
    out = {keymap.to_ldm(k): v for k, v in state.items() if not k.startswith(("controlnet_", "controlnet_cond"))}
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    hint = {"conv_in": 0, **{f"blocks.{j}": 2 * (j + 1) for j in range(blocks)}, "conv_out": 2 * (blocks + 1)}
    for key, value in state.items():
        name, _, param = key.rpartition(".")
        if name.startswith("controlnet_down_blocks."):
            out[f"zero_convs.{name.split('.')[1]}.0.{param}"] = value
        elif name == "controlnet_mid_block":
            out[f"middle_block_out.0.{param}"] = value
        elif name.startswith("controlnet_cond_embedding."):
            out[f"input_hint_block.{hint[name.removeprefix('controlnet_cond_embedding.')]}.{param}"] = value
    return {"control_model." + k: v for k, v in out.items()}


def test_bundled_controlnet_becomes_controlnet(sd1, sd1_file, sd1_models, tmp_path):
    folder, converted = sd1
    control = _original_controlnet_keys(sd1_models["controlnet"])
    # The fixture is in the layout diffusers' own single-file loader reads.
    ref = sfu.convert_controlnet_checkpoint({k: torch.from_numpy(v) for k, v in control.items()},
                                            dict(sd1_models["controlnet"].config))
    want = sd1_models["controlnet"].state_dict()
    assert ref.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(ref[key], value, rtol=0, atol=0, msg=key)
    bundled = tmp_path / "control_sd15.safetensors"
    save_file({**load_file(sd1_file), **control}, bundled)
    out = tmp_path / "model"
    assert run_cli("convert", bundled, "--out", out, "--tokenizer", folder / "tokenizer") == 0
    assert sorted(model_dir.components(out)) == ["controlnet", "text_encoder", "unet", "vae"]
    assert_same_params(out, converted, ("controlnet",))
    config = json.loads((out / "controlnet" / "config.json").read_text())
    assert config["conditioning_embedding_out_channels"] == [8, 16, 16, 32]
    assert config["conditioning_channels"] == 3


# ---------------------------------------------------------------------------------------------- bgjax export


def test_export_then_convert_keeps_the_method(tmp_path, capsys):
    root = tmp_path
    models = sd_models(SD1_UNET, SD1_TEXT, 1)
    for i, name in enumerate(("cg", "pg")):
        models[name] = randomize(ControlNetModel.from_unet(
            models["unet"], conditioning_embedding_out_channels=(8, 16, 16, 32)), 20 + i)
    import_diffusers(save_diffusers_folder(models, root / "src"), root / "model")
    table = np.random.default_rng(0).standard_normal((len(CATEGORIES), 32)).astype(np.float32)
    config = MethodConfig(lambda_cg=0.7, pg_mask_residuals=True)
    save_method(root / "model", config, CATEGORIES, table)
    assert run_cli("export", root / "model", "--out", root / "exported") == 0
    (root / "exported" / "safety_checker").mkdir()  # as in a hub folder; nothing of bgjax's
    capsys.readouterr()
    assert run_cli("convert", root / "exported", "--out", root / "back") == 0
    assert "safety_checker/: not used (bgjax has no safety checker)" in capsys.readouterr().out
    got_config, got_categories, got_table = load_method(root / "back")
    assert (got_config, got_categories) == (config, CATEGORIES)
    np.testing.assert_array_equal(got_table, table)
    assert_same_params(root / "back", root / "model", ("unet", "vae", "text_encoder", "cg", "pg"))
    report = json.loads((root / "back" / "conversion_report.json").read_text())
    assert report["not_used"] == [
        "bgjax_pipeline.py: not used (the loader of bgjax's PyTorch pipeline; `bgjax export` writes it again)",
        "safety_checker/: not used (bgjax has no safety checker)"]

    shutil.rmtree(root / "exported" / "textual_inversion")
    with pytest.raises(CheckpointError, match="no embedding for the identifier token"):
        import_diffusers(root / "exported", root / "back2")
    index = json.loads((root / "exported" / "model_index.json").read_text())
    (root / "exported" / "model_index.json").write_text(json.dumps({**index, "method": None}))
    (root / "exported" / "textual_inversion").mkdir()
    assert "textual_inversion/: not used" in " ".join(import_diffusers(root / "exported", root / "back3").notes)
