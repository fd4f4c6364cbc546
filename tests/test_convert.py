"""diffusers folder -> bgjax model dir -> diffusers folder, and every way a checkpoint can be bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextModel

from bgjax import model_dir
from bgjax.cli import main
from bgjax.convert.checkpoint_io import read_weights
from bgjax.fileio import CheckpointError
from tests.torch_reference import state_dict

LOADERS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "controlnet": ControlNetModel,
           "text_encoder": CLIPTextModel}


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def converted(tiny_diffusers_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bgjax_model")
    assert run_cli("convert", tiny_diffusers_dir, "--out", out) == 0
    return out


def test_round_trip_is_identical_and_loads_without_key_warnings(converted, tiny_models, tmp_path):
    assert sorted(model_dir.components(converted)) == ["controlnet", "text_encoder", "unet", "vae"]
    assert run_cli("export", converted, "--out", tmp_path / "exported") == 0
    for kind, original in tiny_models.items():
        loaded, info = LOADERS[kind].from_pretrained(tmp_path / "exported" / kind, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (kind, info)
        want, got = state_dict(original), state_dict(loaded)
        assert want.keys() == got.keys(), kind
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{kind}: {key}")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "exported", safety_checker=None)
    assert pipe.tokenizer("a rice cooker").input_ids[0] == pipe.tokenizer.bos_token_id


def test_converted_model_dir_loads_with_the_stored_shapes(converted):
    module, params = model_dir.load_component(converted, "unet")
    assert params["conv_in"]["kernel"].shape == (3, 3, 4, 32)  # HWIO
    _, bf16 = model_dir.load_component(converted, "unet", param_dtype=jnp.bfloat16)
    assert bf16["conv_in"]["kernel"].dtype == jnp.bfloat16
    assert params["down_blocks.0"]["attentions.0"]["transformer_blocks.0"]["attn1"]["to_q"]["kernel"].shape == (32, 32)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_unet(folder: Path, edit) -> Path:
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("conv_in.weight"), r"missing keys 'conv_in.weight'"),
        (lambda t: t.update({"mystery.weight": np.zeros(3, np.float32)}), r"unexpected keys 'mystery.weight'"),
        (lambda t: t.update({"conv_in.weight": np.zeros((32, 4, 5, 5), np.float32)}),
         r"key 'conv_in.weight' has shape \(32, 4, 5, 5\), expected \(32, 4, 3, 3\)"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_bad_keys_are_named(tiny_diffusers_dir, tmp_path, edit, message, capsys):
    src = _copy(tiny_diffusers_dir, tmp_path / "src")
    path = _edit_unet(src, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        from bgjax.convert.diffusers_folder import import_diffusers

        import_diffusers(src, tmp_path / "out")
    assert str(path) in str(err.value)
    assert run_cli("convert", src, "--out", tmp_path / "out2") == 2
    assert str(path) in capsys.readouterr().err


def test_truncated_and_non_checkpoint_files(tiny_diffusers_dir, tmp_path):
    path = tiny_diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        read_weights(cut)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.safetensors: not a readable safetensors file"):
        read_weights(text)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="junk.ckpt: not a readable PyTorch checkpoint"):
        read_weights(junk)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="weights.npz: unknown weights format"):
        read_weights(other)


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_ckpt_with_pickled_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(str(marker))}, ckpt)
    with pytest.raises(CheckpointError, match="evil.ckpt: refused"):
        read_weights(ckpt)
    assert not marker.exists()


def test_plain_ckpt_reads_like_safetensors(tmp_path):
    ckpt = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0), "h": torch.ones(2, dtype=torch.bfloat16)}}, ckpt)
    got = read_weights(ckpt)
    np.testing.assert_array_equal(got["w"], np.arange(4.0, dtype=np.float32))
    assert got["h"].dtype == np.float32


def test_cli_reports_missing_folder_parts(tmp_path, capsys):
    (tmp_path / "src" / "unet").mkdir(parents=True)
    assert run_cli("convert", tmp_path / "src", "--out", tmp_path / "out") == 2
    assert "missing vae/, text_encoder/" in capsys.readouterr().err


def test_export_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert run_cli("export", tmp_path, "--out", tmp_path / "out") == 2
    assert "not a bgjax model directory" in capsys.readouterr().err


def _single_file_of(models: dict, path: Path) -> Path:
    from bgjax.convert.ldm import diffusers_to_ldm

    ldm = diffusers_to_ldm(state_dict(models["unet"]), state_dict(models["vae"]), state_dict(models["text_encoder"]),
                           dict(models["unet"].config), dict(models["vae"].config))
    ldm["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)  # a schedule buffer, as real files carry
    save_file(ldm, path)
    return path


def test_single_file_and_diffusers_folder_import_to_identical_params(tiny_diffusers_dir, tiny_models, converted,
                                                                     tmp_path):
    single = _single_file_of(tiny_models, tmp_path / "sd.safetensors")
    out = tmp_path / "from_single"
    # Head counts cannot be read from shapes: the tiny model's configs come from --config.
    assert run_cli("convert", single, "--out", out, "--config", tiny_diffusers_dir) == 0
    for kind in ("unet", "vae", "text_encoder"):
        _, want = model_dir.load_component(converted, kind)
        _, got = model_dir.load_component(out, kind)
        flat_want, flat_got = (dict(jax.tree_util.tree_leaves_with_path(t)) for t in (want, got))
        assert flat_want.keys() == flat_got.keys(), kind
        for path, value in flat_want.items():
            np.testing.assert_array_equal(flat_got[path], value, err_msg=f"{kind} {path}")
    report = json.loads((out / "conversion_report.json").read_text())
    assert {"key": "alphas_cumprod", "reason": report["ignored"][0]["reason"]} in report["ignored"]
    assert (out / "tokenizer" / "vocab.json").is_file()


def test_single_file_without_a_unet_is_rejected(tiny_models, tmp_path, capsys):
    single = _single_file_of(tiny_models, tmp_path / "sd.safetensors")
    tensors = {k: v for k, v in load_file(single).items() if not k.startswith("model.diffusion_model.")}
    save_file(tensors, single)
    assert run_cli("convert", single, "--out", tmp_path / "out") == 2
    assert "not a Stable Diffusion checkpoint: no unet weights" in capsys.readouterr().err


def test_tokenizer_reads_local_files_only(tiny_diffusers_dir, tmp_path):
    from bgjax.models.text_encoder import load_tokenizer

    tok = load_tokenizer(tiny_diffusers_dir / "tokenizer")
    ids = tok("rice cooker", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 512 and ids[12] == 513  # BOS, 11 characters, EOS
    with pytest.raises(FileNotFoundError, match=r"needs tokenizer.json, or vocab.json \+ merges.txt"):
        load_tokenizer(tmp_path)


def test_bin_weights_convert_like_safetensors(tiny_models, converted, tmp_path):
    from bgjax.convert.diffusers_folder import import_diffusers
    from tests.conftest import save_diffusers_folder

    src = save_diffusers_folder(tiny_models, tmp_path / "src")
    for kind in ("unet", "vae"):  # the older PyTorch pickle format, read with weights_only
        folder = src / kind
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        tiny_models[kind].save_pretrained(folder, safe_serialization=False)
        assert (folder / "diffusion_pytorch_model.bin").is_file()
    import_diffusers(src, tmp_path / "out")
    for kind in ("unet", "vae"):
        _, want = model_dir.load_component(converted, kind)
        _, got = model_dir.load_component(tmp_path / "out", kind)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
