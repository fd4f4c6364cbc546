"""Exported CG / PG / identifiers run in diffusers (with bgjax.torch_compat) as they run in bgjax."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel

from bgjax import model_dir
from bgjax.cli import main
from bgjax.convert.diffusers_folder import import_diffusers
from bgjax.method.config import MethodConfig
from bgjax.method.denoiser import Denoiser, load_denoiser
from bgjax.method.prompts import PromptBuilder, embed_with_identifiers
from bgjax.method.store import load_method, save_method
from bgjax.models.region import Region
from bgjax.models.text_encoder import load_tokenizer
from bgjax.torch_compat import BackgroundDenoiser, BackgroundTorchPipeline
from tests.conftest import save_diffusers_folder, tiny_torch_pipeline
from tests.torch_reference import nchw, nhwc, randomize, rel_err

CATEGORIES = ["rice cooker", "lamp", "电饭煲"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("method")
    models = tiny_torch_pipeline(seed=7, controlnet=False)
    for i, name in enumerate(("cg", "pg")):  # random, not zero, outputs: the branches must matter
        models[name] = randomize(ControlNetModel.from_unet(models["unet"], conditioning_embedding_out_channels=(8, 16)),
                                 seed=20 + i)
    save_diffusers_folder(models, root / "src")
    import_diffusers(root / "src", root / "model")
    hidden = models["text_encoder"].config.hidden_size
    table = np.random.default_rng(0).standard_normal((len(CATEGORIES), hidden)).astype(np.float32)
    save_method(root / "model", MethodConfig(), CATEGORIES, table)
    assert main(["export", str(root / "model"), "--out", str(root / "out")]) == 0
    return root


def _inputs(builder, seed=0):
    rng = np.random.default_rng(seed)
    prompts = builder.batch(["rice cooker", "lamp"])
    mask = np.zeros((2, 32, 32), np.float32)
    mask[0, 6:20, 9:25], mask[1, 3:30, 12:18] = 1.0, 1.0
    mask[:, 5, :] = 0.5  # a soft edge: M_r is area-averaged, not thresholded
    return dict(latents=rng.standard_normal((2, 16, 16, 4)).astype(np.float32), timesteps=np.array([21, 640]),
                context=rng.standard_normal((2, 77, 32)).astype(np.float32), mask=mask, prompts=prompts,
                cg_cond=rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
                pg_cond=rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))


@pytest.mark.parametrize(("mask_guided_unet", "pg_mask_residuals"), [(False, False), (True, True)],
                         ids=["paper-default", "unet-guided+pg-residuals"])
def test_exported_branches_match_bgjax_in_diffusers(exported, mask_guided_unet, pg_mask_residuals):
    model, out = exported / "model", exported / "out"
    builder = PromptBuilder(load_tokenizer(model / "tokenizer"), MethodConfig())
    x = _inputs(builder)
    region = Region(x["mask"], x["prompts"]["fg_tokens"], x["prompts"]["bg_tokens"])

    config, categories, table = load_method(model)
    save_method(model, dataclasses.replace(config, mask_guided_unet=mask_guided_unet,
                                                     pg_mask_residuals=pg_mask_residuals), categories, table)
    denoiser, params, _ = load_denoiser(model)
    assert denoiser.pg.mask_residuals == pg_mask_residuals
    got = denoiser(params, x["latents"], x["timesteps"], x["context"], region, x["cg_cond"], x["pg_cond"], 0.8, 1.2)

    torch_denoiser = BackgroundDenoiser(UNet2DConditionModel.from_pretrained(out / "unet"),
                                        ControlNetModel.from_pretrained(out / "cg"),
                                        ControlNetModel.from_pretrained(out / "pg"),
                                        mask_guided_unet=mask_guided_unet, pg_mask_residuals=pg_mask_residuals)
    t = {k: torch.from_numpy(v) for k, v in (("mask", x["mask"]), ("fg", x["prompts"]["fg_tokens"]),
                                             ("bg", x["prompts"]["bg_tokens"]))}
    with torch.no_grad():
        want = torch_denoiser(torch.from_numpy(nchw(x["latents"])), torch.from_numpy(x["timesteps"]),
                              torch.from_numpy(x["context"]), t["mask"], t["fg"], t["bg"],
                              cg_cond=torch.from_numpy(nchw(x["cg_cond"])),
                              pg_cond=torch.from_numpy(nchw(x["pg_cond"])), lambda_cg=0.8, lambda_pg=1.2)
    plain = Denoiser(denoiser.unet)(params, x["latents"], x["timesteps"], x["context"], region)
    assert rel_err(got, plain) > 1e-2  # the branches change the prediction, so the match below means something
    err = rel_err(got, nhwc(want))
    print(f"exported CG+PG in diffusers vs bgjax ({mask_guided_unet=}, {pg_mask_residuals=}): {err:.2e}")
    assert err <= 1e-4


def test_identifiers_load_as_textual_inversion_and_encode_alike(exported):
    model, out = exported / "model", exported / "out"
    config, categories, table = load_method(model)
    # The export loads as bgjax's pipeline (its model_index.json says so); its plain Stable Diffusion parts
    # make diffusers' own pipeline, into which the identifiers load as textual inversion.
    pipe = StableDiffusionPipeline.from_pipe(BackgroundTorchPipeline.from_pretrained(out), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    files = sorted((out / "textual_inversion").glob("*.safetensors"))
    assert len(files) == len(CATEGORIES)
    for f in files:
        pipe.load_textual_inversion(str(f))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<bg-电饭煲>")
    np.testing.assert_array_equal(pipe.text_encoder.get_input_embeddings().weight[token_id].detach().numpy(), table[2])

    builder = PromptBuilder(load_tokenizer(model / "tokenizer"), config)
    prompt = builder("lamp")
    text_encoder, params = model_dir.load_component(model, "text_encoder")
    embeds = embed_with_identifiers(params["text_model"]["embeddings.token_embedding"]["embedding"],
                                    prompt.input_ids[None], jnp.array([prompt.identifier_index]), table,
                                    jnp.array([categories.index("lamp")]))
    ours = text_encoder.apply({"params": params}, prompt.input_ids[None], embeds)
    torch_ids = pipe.tokenizer(prompt.text.replace("*", "<bg-lamp>"), padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    assert torch_ids[0, prompt.identifier_index] == pipe.tokenizer.convert_tokens_to_ids("<bg-lamp>")
    with torch.no_grad():
        theirs = pipe.text_encoder(torch_ids).last_hidden_state.numpy()
    assert rel_err(ours, theirs) <= 1e-5


def test_model_dir_depends_only_on_models_and_fileio():
    """bgjax.model_dir is a leaf over bgjax.models and bgjax.fileio (no method/, convert/, train/)."""
    code = "import sys, bgjax.model_dir; print(sorted(m for m in sys.modules if m.startswith('bgjax')))"
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert {m for m in loaded if not m.startswith("bgjax.models")} == {"bgjax", "bgjax.fileio", "bgjax.model_dir"}
