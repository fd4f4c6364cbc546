"""The whole sampling path against diffusers' own pipelines, loaded with `from_pretrained` from the folder
that diffusers saved: text encoding, the sampler with classifier-free guidance, a plain ControlNet, decoding.

fp32, random weights; the same NCHW latents go to diffusers and (as NHWC) to bgjax."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bgjax.cli import main
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from bgjax.sampling.pipeline import BackgroundPipeline
from tests.conftest import tiny_torch_pipeline
from tests.torch_reference import CLIP_SD1_TINY, nchw, nhwc, randomize, rel_err

SAMPLERS = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
STEPS, GUIDANCE, SIZE, NUM = 5, 7.5, 32, 2
PROMPT, NEGATIVE = "a rice cooker on a wooden table, soft light", "blurry, dark"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(a StableDiffusionControlNetPipeline folder written by its save_pretrained, its bgjax conversion)."""
    root = tmp_path_factory.mktemp("parity")
    models = tiny_torch_pipeline(seed=4, controlnet=False)
    models["text_encoder"] = randomize(CLIPTextModel(CLIPTextConfig(**{**CLIP_SD1_TINY, "hidden_size": 32,
                                                                        "intermediate_size": 64})), seed=6)
    controlnet = randomize(ControlNetModel.from_unet(models["unet"], conditioning_embedding_out_channels=(8, 16)),
                           seed=8, scale=0.1)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(root / "byte_tokenizer")))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionControlNetPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer, unet=models["unet"],
        controlnet=controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(root / "diffusers")
    assert main(["convert", str(root / "diffusers"), "--out", str(root / "model")]) == 0
    return root / "diffusers", root / "model"


@pytest.fixture(scope="module")
def bgjax_pipe(folders) -> BackgroundPipeline:
    return BackgroundPipeline.from_pretrained(folders[1])


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((NUM, SIZE // 2, SIZE // 2, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def control_image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _diffusers(cls, folder: Path, sampler: str, latents: np.ndarray, height: int = SIZE, width: int = SIZE,
               **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(final latents NHWC, images in [0, 1]) of one diffusers pipeline call, one image per latent."""
    pipe = cls.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)  # how a diffusers user switches
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep_latents(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()  # after the last step: what is decoded
        return tensors

    with torch.no_grad():
        images = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(nchw(latents)),
                      num_images_per_prompt=len(latents), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      height=height, width=width, output_type="np", callback_on_step_end=keep_latents, **kwargs).images
    return nhwc(final["latents"]), np.asarray(images, np.float32)


def _check(ours_latents, ours_images, ref_latents, ref_images, what: str) -> None:
    err = rel_err(ours_latents, ref_latents)
    image_err = float(np.abs(ours_images - ref_images).max())
    print(f"{what}: latents rel err {err:.2e}, images max abs err {image_err:.2e}")
    assert err < 1e-4, what
    assert image_err < 1e-4, what


def _text_to_image(pipe: BackgroundPipeline, sampler: str, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(final latents, images) of bgjax's text_to_image with the settings `_diffusers` uses."""
    common = dict(negative_prompt=NEGATIVE, latents=latents, num_images=NUM, steps=STEPS, guidance=GUIDANCE,
                  sampler=sampler, width=SIZE, height=SIZE)
    return (pipe.text_to_image(PROMPT, output_type="latent", **common),
            pipe.text_to_image(PROMPT, output_type="np", **common))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_text_to_image_matches_stable_diffusion_pipeline(folders, bgjax_pipe, latents, sampler):
    ours_x, ours_im = _text_to_image(bgjax_pipe, sampler, latents)
    ref_x, ref_im = _diffusers(StableDiffusionPipeline, folders[0], sampler, latents)
    _check(ours_x, ours_im, ref_x, ref_im, f"text_to_image {sampler}")
    # The negative prompt is used: another one moves the result far beyond the tolerance.
    other = bgjax_pipe.text_to_image(PROMPT, output_type="latent", negative_prompt="", latents=latents,
                                     num_images=NUM, steps=STEPS, guidance=GUIDANCE, sampler=sampler, width=SIZE,
                                     height=SIZE)
    assert rel_err(other, ref_x) > 1e-2


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_controlnet_matches_stable_diffusion_controlnet_pipeline(folders, bgjax_pipe, latents, control_image,
                                                                sampler):
    common = dict(negative_prompt=NEGATIVE, latents=latents, num_images=NUM, steps=STEPS, guidance=GUIDANCE,
                  sampler=sampler, width=SIZE, height=SIZE, control_image=control_image)
    ours_x = bgjax_pipe.text_to_image(PROMPT, output_type="latent", **common)
    ours_im = bgjax_pipe.text_to_image(PROMPT, output_type="np", **common)
    ref_x, ref_im = _diffusers(StableDiffusionControlNetPipeline, folders[0], sampler, latents, image=control_image)
    _check(ours_x, ours_im, ref_x, ref_im, f"controlnet {sampler}")
    # The ControlNet matters: without it the result is far from diffusers' ControlNet pipeline.
    plain = bgjax_pipe.text_to_image(PROMPT, output_type="latent", **{**common, "control_image": None})
    assert rel_err(plain, ref_x) > 1e-2


def test_eval_controlnet_variant_runs_the_converted_controlnet(bgjax_pipe, control_image):
    from bgjax.eval.harness import variant_pipeline

    variant = variant_pipeline(bgjax_pipe, "controlnet")
    assert variant.cg_source == "controlnet" and variant.models.denoiser.cg is bgjax_pipe.controlnet
    assert not variant.has_pg
    np.testing.assert_array_equal(variant.params["denoiser"]["cg"]["controlnet_mid_block"]["kernel"],
                                  bgjax_pipe.params["controlnet"]["controlnet_mid_block"]["kernel"])
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:24, 10:20] = True
    product = np.asarray(control_image)
    (image,) = variant(product, mask, "lamp", num_images=1, steps=2)
    np.testing.assert_array_equal(np.asarray(image)[mask], product[mask])


def test_non_square_text_to_image_matches(folders, bgjax_pipe):
    """Width and height apart (NHWC here, NCHW there): a transposed size would not even run."""
    latents = np.random.default_rng(2).standard_normal((NUM, 8, SIZE // 2, 4)).astype(np.float32)
    pipe = StableDiffusionPipeline.from_pretrained(folders[0], safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(nchw(latents)),
                   num_images_per_prompt=NUM, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=16,
                   width=SIZE, output_type="np").images
    ours = bgjax_pipe.text_to_image(PROMPT, negative_prompt=NEGATIVE, latents=latents, num_images=NUM, steps=STEPS,
                                    guidance=GUIDANCE, sampler="dpmpp_2m", width=SIZE, height=16, output_type="np")
    assert ours.shape == (NUM, 16, SIZE, 3)
    assert float(np.abs(ours - ref).max()) < 1e-4


@pytest.fixture(scope="module")
def zero_snr_folders(folders, tmp_path_factory) -> tuple[Path, Path]:
    """The same pipeline as a zero-terminal-SNR v-prediction model (Lin et al. 2024): diffusers'
    DDIMScheduler with those arguments writes the scheduler config, then `bgjax convert`."""
    import shutil

    root = tmp_path_factory.mktemp("zero_snr")
    shutil.copytree(folders[0], root / "diffusers")
    scheduler = DDIMScheduler.from_pretrained(folders[0] / "scheduler", prediction_type="v_prediction",
                                              timestep_spacing="trailing", rescale_betas_zero_snr=True)
    scheduler.save_pretrained(root / "diffusers" / "scheduler")
    assert main(["convert", str(root / "diffusers"), "--out", str(root / "model")]) == 0
    return root / "diffusers", root / "model"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_zero_terminal_snr_v_prediction_matches_stable_diffusion_pipeline(zero_snr_folders, latents, sampler):
    """With the betas left unrescaled the latents are 1e-2 to 3e-2 off (relative), far past the 1e-4 here."""
    ours_x, ours_im = _text_to_image(BackgroundPipeline.from_pretrained(zero_snr_folders[1]), sampler, latents)
    ref_x, ref_im = _diffusers(StableDiffusionPipeline, zero_snr_folders[0], sampler, latents)
    _check(ours_x, ours_im, ref_x, ref_im, f"zero terminal SNR {sampler}")


@pytest.mark.slow
@pytest.mark.big_memory(weights_gb=4.3)
def test_sd15_shapes_text_to_image_matches_stable_diffusion_pipeline(tmp_path):
    """The real SD-1.5 UNet, VAE and CLIP ViT-L text encoder configs (diffusers' / transformers' default init,
    random), 256 x 192 px, 5 DPM-Solver++ steps, guidance 7.5, fp32. One side at a time in memory: the
    diffusers pipeline is built, saved and freed, loaded back with `from_pretrained`, run and freed; then
    `bgjax convert` and bgjax's pipeline."""
    import gc

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tests.torch_reference import SD15

    torch.manual_seed(0)
    vae = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    clip = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=512,
                eos_token_id=513, pad_token_id=513)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**clip)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(tmp_path / "byte_tokenizer"))),
        unet=UNet2DConditionModel(**SD15).eval(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd15")
    del pipe
    gc.collect()

    width, height = 256, 192
    latents = np.random.default_rng(3).standard_normal((1, height // 8, width // 8, 4)).astype(np.float32)
    ref_latents, ref_images = _diffusers(StableDiffusionPipeline, tmp_path / "sd15", "dpmpp_2m", latents, height,
                                         width)
    gc.collect()

    assert main(["convert", str(tmp_path / "sd15"), "--out", str(tmp_path / "model")]) == 0
    ours = BackgroundPipeline.from_pretrained(tmp_path / "model")
    common = dict(negative_prompt=NEGATIVE, latents=latents, steps=STEPS, guidance=GUIDANCE, sampler="dpmpp_2m",
                  width=width, height=height)
    _check(ours.text_to_image(PROMPT, output_type="latent", **common),
           ours.text_to_image(PROMPT, output_type="np", **common), ref_latents, ref_images, "SD-1.5 shapes, 256x192")
