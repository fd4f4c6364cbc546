"""Generation on SDXL models: the text-to-image path against `StableDiffusionXLPipeline` loaded with
`from_pretrained` from the folder diffusers saved (both text encoders, the pooled embedding, the added time ids,
classifier-free guidance with the negative pooled embedding and time ids, zeros for no negative prompt), and the
product pipeline and `bgjax generate` with CG on an SDXL method model at a non-square size.

fp32, random weights with every tensor perturbed; the same NCHW latents go to diffusers and (as NHWC) to bgjax."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from bgjax.cli import main
from bgjax.convert.diffusers_folder import import_diffusers
from bgjax.method.config import MethodConfig
from bgjax.method.store import save_method
from bgjax.sampling.pipeline import BackgroundPipeline
from tests.conftest import save_sdxl_folder, tiny_sdxl_pipeline
from tests.torch_reference import nchw, nhwc, randomize, rel_err

SAMPLERS = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
STEPS, GUIDANCE, NUM = 4, 6.0, 2
HEIGHT, WIDTH = 32, 48  # non-square: the time ids' (h, w) and the latents' layout must not be swapped
PROMPT, NEGATIVE = "a rice cooker on a wooden table, soft light", "blurry, dark"
NEGATIVES = {"negative": NEGATIVE, "none": None, "empty": ""}
CATEGORIES = ["rice cooker", "lamp"]
TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(a StableDiffusionXLPipeline folder written by its save_pretrained, plus a random CG beside it; the bgjax
    model converted from it, with random identifier tables for both encoders)."""
    root = tmp_path_factory.mktemp("sdxl_generation")
    models = tiny_sdxl_pipeline(seed=60, controlnet=False)
    folder = save_sdxl_folder(models, root / "diffusers")
    randomize(ControlNetModel.from_unet(models["unet"], conditioning_embedding_out_channels=(8, 16)),
              seed=70, scale=0.1).save_pretrained(folder / "cg")
    import_diffusers(folder, root / "model")
    rng = np.random.default_rng(0)
    tables = [rng.standard_normal((len(CATEGORIES), models[k].config.hidden_size)).astype(np.float32)
              for k in ("text_encoder", "text_encoder_2")]
    save_method(root / "model", MethodConfig(), CATEGORIES, *tables)
    return folder, root / "model"


@pytest.fixture(scope="module")
def pipe(folders) -> BackgroundPipeline:
    return BackgroundPipeline.from_pretrained(folders[1])


@pytest.fixture(scope="module")
def reference(folders):
    """diffusers' pipeline from the saved folder (its model_index.json: force_zeros_for_empty_prompt true)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folders[0], add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    return pipe


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((NUM, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)


def _diffusers(pipe: StableDiffusionXLPipeline, sampler: str, latents: np.ndarray, negative: str | None,
               output_type: str) -> np.ndarray:
    """One diffusers call: the final latents (NHWC) for output_type="latent" (what the pipeline returns
    undecoded), the images in [0, 1] for "np"."""
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)  # how a diffusers user switches
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=negative, latents=torch.from_numpy(nchw(latents)),
                   num_images_per_prompt=len(latents), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   height=HEIGHT, width=WIDTH, output_type=output_type).images
    return nhwc(out) if output_type == "latent" else np.asarray(out, np.float32)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_text_to_image_matches_stable_diffusion_xl_pipeline(pipe, reference, latents, sampler):
    """Final latents for each kind of negative prompt; the decoded images for one (the decode is the same)."""
    common = dict(latents=latents, num_images=NUM, steps=STEPS, guidance=GUIDANCE, sampler=sampler, width=WIDTH,
                  height=HEIGHT)
    ours = {}
    for name, negative in NEGATIVES.items():
        ours[name] = pipe.text_to_image(PROMPT, negative_prompt=negative, output_type="latent", **common)
        err = rel_err(ours[name], _diffusers(reference, sampler, latents, negative, "latent"))
        print(f"SDXL text_to_image {sampler}, {name} negative prompt: final latents rel err {err:.2e}")
        assert err <= TOL, (sampler, name)
    images = pipe.text_to_image(PROMPT, negative_prompt=NEGATIVE, output_type="np", **common)
    image_err = float(np.abs(images - _diffusers(reference, sampler, latents, NEGATIVE, "np")).max())
    print(f"SDXL text_to_image {sampler}: images max abs err {image_err:.2e}")
    assert images.shape == (NUM, HEIGHT, WIDTH, 3) and image_err <= TOL
    # Each unconditional pass is its own: zeros (no negative prompt) are not the encoded "" nor the negative.
    assert rel_err(ours["none"], ours["empty"]) > 1e-2 and rel_err(ours["none"], ours["negative"]) > 1e-2


def test_zeros_only_where_diffusers_zeros(pipe):
    """None is zeros under force_zeros_for_empty_prompt, "" is always encoded; without the flag None is ""."""
    assert pipe.sdxl and pipe.unconditional(None) is None and pipe.unconditional("") == ""
    assert pipe.unconditional(NEGATIVE) == NEGATIVE
    other = copy.copy(pipe)
    other.zeros_for_empty_prompt = False
    assert other.unconditional(None) == ""


@pytest.fixture(scope="module")
def product() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[8:26, 14:30] = True
    return photo, mask


def test_product_pipeline_with_cg_keeps_the_product(pipe, product):
    """A 48 x 32 canvas (a non-square bucket at tiny size) on an SDXL method model: the product's pixels come back
    unchanged, and CG moves the background (lambda_cg 0 gives other images)."""
    photo, mask = product
    assert pipe.has_cg and not pipe.has_pg and pipe.inputs.base_model is False
    common = dict(num_images=1, steps=2, seed=3, width=WIDTH, height=HEIGHT, output_type="np")
    with_cg = pipe(photo, mask, "lamp", **common)
    without = pipe(photo, mask, "lamp", lambda_cg=0.0, **common)
    assert with_cg.shape == (1, HEIGHT, WIDTH, 3)
    (image,) = pipe(photo, mask, "lamp", **{**common, "output_type": "pil"})
    np.testing.assert_array_equal(np.asarray(image)[mask], photo[mask])
    diff = float(np.abs(with_cg - without)[0][~mask].mean())
    print(f"SDXL CG vs lambda_cg=0: mean abs difference on the background {diff:.3f}")
    assert diff > 1e-3


def test_generate_cli_on_sdxl_at_a_non_square_size(folders, product, tmp_path):
    photo, mask = product
    Image.fromarray(photo).save(tmp_path / "product.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(folders[1]), "--product", str(tmp_path / "product.png"), "--mask",
                 str(tmp_path / "mask.png"), "--category", "lamp", "--width", str(WIDTH), "--height", str(HEIGHT),
                 "--steps", "2", "--seed", "3", "--num-images", "1", "--out", str(out)]) == 0
    (png,) = out.glob("*.png")
    image = Image.open(png)
    assert image.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB"))[mask], photo[mask])
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["negative_prompt"] is None  # no --negative-prompt: zeros, as diffusers
