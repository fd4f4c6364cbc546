"""The method on SDXL against diffusers: prompts for both tokenizers, the conditioning `StableDiffusionXLPipeline.
encode_prompt` computes (penultimate states concatenated, the pooled projection), identifiers exported in
diffusers' SDXL textual-inversion layout and loaded into both encoders with `load_textual_inversion`, and the
exported CG / PG (mask-guided cross-attention over the concatenated context) run in diffusers with
bgjax.torch_compat as they run in bgjax."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from bgjax import model_dir
from bgjax.cli import main
from bgjax.convert.diffusers_folder import import_diffusers
from bgjax.method.config import MethodConfig
from bgjax.method.denoiser import Denoiser, load_denoiser
from bgjax.method.prompts import PromptBuilder
from bgjax.method.store import load_identifier_tables, load_method, save_method
from bgjax.method.text import TextEncoders
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from bgjax.models.region import Region
from bgjax.models.text_encoder import load_tokenizer
from bgjax.models.unet import AddedCond
from bgjax.torch_compat import BackgroundDenoiser
from tests.conftest import save_sdxl_folder, tiny_sdxl_pipeline
from tests.torch_reference import nchw, nhwc, randomize, rel_err

CATEGORIES = ["rice cooker", "lamp", "电饭煲"]
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny SDXL model with random CG, PG and identifier tables, converted, then exported."""
    root = tmp_path_factory.mktemp("sdxl_method")
    models = tiny_sdxl_pipeline(seed=40, controlnet=False)
    folder = save_sdxl_folder(models, root / "src")
    for i, name in enumerate(("cg", "pg")):  # random, not zero, outputs: the branches must matter
        randomize(ControlNetModel.from_unet(models["unet"], conditioning_embedding_out_channels=(8, 16)),
                  seed=50 + i).save_pretrained(folder / name)
    import_diffusers(folder, root / "model")
    rng = np.random.default_rng(0)
    tables = [rng.standard_normal((len(CATEGORIES), models[k].config.hidden_size)).astype(np.float32)
              for k in ("text_encoder", "text_encoder_2")]
    save_method(root / "model", MethodConfig(), CATEGORIES, *tables)
    assert main(["export", str(root / "model"), "--out", str(root / "out")]) == 0
    return root


def _builder(model: Path, config: MethodConfig | None = None) -> PromptBuilder:
    return PromptBuilder(load_tokenizer(model / "tokenizer"), config or MethodConfig(),
                         tokenizer_2=load_tokenizer(model / "tokenizer_2"))


def _text(model: Path) -> tuple[TextEncoders, dict]:
    modules, params = {}, {}
    for kind in ("text_encoder", "text_encoder_2"):
        modules[kind], params[kind] = model_dir.load_component(model, kind)
    return TextEncoders.of(modules), params


def test_prompt_spans_and_ids_for_both_tokenizers(exported, tmp_path):
    model = exported / "model"
    both, one = _builder(model), PromptBuilder(load_tokenizer(model / "tokenizer"), MethodConfig())
    pad_2 = load_tokenizer(model / "tokenizer_2").pad_token_id
    for category in CATEGORIES:
        got, want = both(category), one(category)
        for field in ("input_ids", "fg_tokens", "bg_tokens"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        assert got.identifier_index == want.identifier_index > 0
        n = int(np.argmax(got.input_ids == 513)) + 1  # up to the first EOS the two agree; then each pads its own way
        np.testing.assert_array_equal(got.input_ids_2[:n], got.input_ids[:n])
        assert (got.input_ids_2[n:] == pad_2).all() and pad_2 != 513
    assert both.batch(CATEGORIES)["input_ids_2"].shape == (3, 77)
    # a second tokenizer that splits words differently (a merge "r i") cannot share the spans
    other = write_byte_tokenizer(tmp_path / "merged")
    vocab = json.loads((other / "vocab.json").read_text())
    (other / "vocab.json").write_text(json.dumps({**vocab, "ri": len(vocab)}))
    (other / "merges.txt").write_text("#version: 0.2\nr i\n")
    builder = PromptBuilder(load_tokenizer(model / "tokenizer"), MethodConfig(), tokenizer_2=load_tokenizer(other))
    with pytest.raises(ValueError, match="SDXL's two tokenizers split it differently"):
        builder("rice cooker")


def test_conditioning_matches_encode_prompt(exported):
    """E = both penultimate states concatenated and the pooled embedding, as StableDiffusionXLPipeline makes them
    from the exported folder (its tokenizers' ids equal the builder's)."""
    model, out = exported / "model", exported / "out"
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    prompt = _builder(model).custom("a {category} on a marble counter, soft light", "rice cooker")
    for tokenizer, ids in ((pipe.tokenizer, prompt.input_ids), (pipe.tokenizer_2, prompt.input_ids_2)):
        want_ids = tokenizer(prompt.text, padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(ids, want_ids)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt.text, device="cpu", do_classifier_free_guidance=False)
    encoders, params = _text(model)
    got = encoders(params, {"input_ids": prompt.input_ids[None], "input_ids_2": prompt.input_ids_2[None]})
    errors = (rel_err(got.context, embeds.numpy()), rel_err(got.pooled, pooled.numpy()))
    print(f"SDXL conditioning vs encode_prompt: context {errors[0]:.2e}, pooled {errors[1]:.2e}")
    assert got.context.shape == (1, 77, 80) and max(errors) <= TOL


def test_identifiers_load_into_both_encoders_and_encode_alike(exported):
    """Each exported file holds `clip_l` and `clip_g`; loaded as diffusers documents for SDXL embeddings, the
    prompt with the token encodes as bgjax encodes it with e_c spliced into both encoders (the pooled embedding
    too: SDXL pools at the largest token id, which the added token has)."""
    model, out = exported / "model", exported / "out"
    config, categories, _ = load_method(model)
    tables = load_identifier_tables(model)
    tokens = json.loads((out / "textual_inversion" / "tokens.json").read_text())["tokens"]
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    for i, token in enumerate(tokens):
        state = load_file(out / "textual_inversion" / f"{i:04d}.safetensors")
        assert set(state) == {"clip_l", "clip_g"}
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
    for encoder, tokenizer, name in ((pipe.text_encoder, pipe.tokenizer, "identifiers"),
                                     (pipe.text_encoder_2, pipe.tokenizer_2, "identifiers_2")):
        rows = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)].detach().numpy()
        np.testing.assert_array_equal(rows, tables[name])

    prompt = _builder(model, config)("lamp")
    encoders, params = _text(model)
    params.update({k: jnp.asarray(v) for k, v in tables.items()})
    got = encoders(params, {"input_ids": prompt.input_ids[None], "input_ids_2": prompt.input_ids_2[None],
                            "identifier_index": jnp.array([prompt.identifier_index]),
                            "identifier_row": jnp.array([categories.index("lamp")])})
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt.text.replace("*", "<bg-lamp>"), device="cpu",
                                                  do_classifier_free_guidance=False)
    errors = (rel_err(got.context, embeds.numpy()), rel_err(got.pooled, pooled.numpy()))
    print(f"SDXL conditioning with identifiers vs diffusers' textual inversion: {errors}")
    assert max(errors) <= TOL


def test_import_of_the_export_restores_both_tables(exported, tmp_path):
    assert main(["convert", str(exported / "out"), "--out", str(tmp_path / "again")]) == 0
    for name, table in load_identifier_tables(exported / "model").items():
        np.testing.assert_array_equal(load_identifier_tables(tmp_path / "again")[name], table, err_msg=name)
    shutil.rmtree(tmp_path / "again")


def test_exported_branches_match_bgjax_in_diffusers(exported):
    """UNet + CG + PG with SDXL's added conditioning, mask-guided cross-attention over the 80-wide concatenated
    context in CG and (`mask_guided_unet`) the UNet, PG's outputs and (`pg_mask_residuals`) residuals masked:
    bgjax's Denoiser and diffusers' models from the export with bgjax.torch_compat agree. (The two settings'
    other values are SD's paths, tests/test_method_export.py.)"""
    mask_guided_unet = pg_mask_residuals = True
    model, out = exported / "model", exported / "out"
    config, categories, table = load_method(model)
    save_method(model, MethodConfig(mask_guided_unet=mask_guided_unet, pg_mask_residuals=pg_mask_residuals),
                categories, table, load_identifier_tables(model)["identifiers_2"])
    rng = np.random.default_rng(1)
    prompts = _builder(model).batch(["rice cooker", "lamp"])
    mask = np.zeros((2, 32, 32), np.float32)
    mask[0, 6:20, 9:25], mask[1, 3:30, 12:18], mask[:, 5, :] = 1.0, 1.0, 0.5
    latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, 80)).astype(np.float32)
    cg_cond, pg_cond = (rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32) for _ in range(2))
    added = AddedCond(rng.standard_normal((2, 24)).astype(np.float32),
                      np.array([[1024, 768, 0, 64, 1024, 1024], [640, 512, 16, 0, 896, 1152]], np.float32))
    t = np.array([21, 640])
    region = Region(mask, prompts["fg_tokens"], prompts["bg_tokens"])

    denoiser, params, _ = load_denoiser(model)
    got = denoiser(params, latents, t, context, region, cg_cond, pg_cond, 0.8, 1.2, added)
    plain = Denoiser(denoiser.unet)(params, latents, t, context, region, added=added)
    torch_denoiser = BackgroundDenoiser(UNet2DConditionModel.from_pretrained(out / "unet"),
                                        ControlNetModel.from_pretrained(out / "cg"),
                                        ControlNetModel.from_pretrained(out / "pg"),
                                        mask_guided_unet=mask_guided_unet, pg_mask_residuals=pg_mask_residuals)
    tensor = torch.from_numpy
    with torch.no_grad():
        want = torch_denoiser(tensor(nchw(latents)), tensor(t), tensor(context), tensor(mask),
                              tensor(prompts["fg_tokens"]), tensor(prompts["bg_tokens"]), cg_cond=tensor(nchw(cg_cond)),
                              pg_cond=tensor(nchw(pg_cond)), lambda_cg=0.8, lambda_pg=1.2,
                              added_cond_kwargs={"text_embeds": tensor(added.text_embeds),
                                                 "time_ids": tensor(added.time_ids)})
    err = rel_err(got, nhwc(want))
    print(f"exported SDXL CG+PG in diffusers vs bgjax ({mask_guided_unet=}, {pg_mask_residuals=}): {err:.2e}")
    assert rel_err(got, plain) > 1e-2 and err <= TOL
