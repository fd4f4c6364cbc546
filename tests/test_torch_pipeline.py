"""The exported model served in PyTorch (`bgjax.torch_compat.BackgroundTorchPipeline`, loaded by diffusers'
`from_pretrained` from the folder `bgjax export` wrote) makes the images `BackgroundPipeline` makes; and an
export converted back generates what the original model generates.

fp32, the tiny model of `method_model`: CG and PG with random weights everywhere (their zero-initialised
output convs too), random identifiers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from bgjax.cli import main
from bgjax.sampling.pipeline import BackgroundPipeline
from bgjax.torch_compat import BackgroundTorchPipeline
from tests.torch_reference import nchw

SCHEDULERS = {"dpmpp_2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
STEPS, NUM = 3, 2


@pytest.fixture(scope="module")
def exported(method_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torch_pipeline") / "exported"
    assert main(["export", str(method_model), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ours(method_model) -> BackgroundPipeline:
    return BackgroundPipeline.from_pretrained(method_model)


@pytest.fixture(scope="module")
def theirs(exported) -> BackgroundTorchPipeline:
    pipe = BackgroundTorchPipeline.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inputs() -> dict:
    rng = np.random.default_rng(11)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 10:22] = True
    reference_mask = np.zeros((40, 48), bool)
    reference_mask[6:30, 14:30] = True
    return dict(product=rng.integers(0, 256, (32, 32, 3), np.uint8), mask=mask,
                reference=rng.integers(0, 256, (40, 48, 3), np.uint8), reference_mask=reference_mask,
                latents=rng.standard_normal((NUM, 16, 16, 4)).astype(np.float32),
                wide_latents=rng.standard_normal((NUM, 16, 32, 4)).astype(np.float32))


def test_torch_compat_imports_without_jax():
    code = ("import sys, bgjax.torch_compat; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_export_names_the_pipeline_diffusers_loads(exported, theirs, inputs):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == ["bgjax_pipeline", "BackgroundTorchPipeline"]
    assert index["method"]["categories"] == ["rice cooker", "lamp", "coffee mug"]
    assert index["cg"] == index["pg"] == ["diffusers", "ControlNetModel"]
    generic = DiffusionPipeline.from_pretrained(exported, trust_remote_code=True)
    assert type(generic) is BackgroundTorchPipeline  # the class itself, imported by the folder's two lines
    generic.set_progress_bar_config(disable=True)
    (image,) = generic(inputs["product"], inputs["mask"], "coffee mug", num_inference_steps=1).images
    assert image.size == (32, 32)  # its identifiers came from the folder it was loaded from, on first use:
    assert generic._identifier_ids == [generic.tokenizer.convert_tokens_to_ids(f"<bg-{name}>")
                                       for name in ("rice_cooker", "lamp", "coffee_mug")]
    assert len(set(generic._identifier_ids)) == 3 and generic.tokenizer.unk_token_id not in generic._identifier_ids
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers runs a folder's code only when told
        DiffusionPipeline.from_pretrained(exported)
    assert theirs.cg is not None and theirs.pg is not None
    assert theirs.inputs.vocabulary.names == index["method"]["categories"]


@pytest.mark.parametrize(("sampler", "style_guidance", "canvas", "keep_product", "edge_fill"),
                         [("dpmpp_2m", False, None, False, False), ("dpmpp_2m", True, None, False, False),
                          ("euler", True, (64, 32), False, False), ("euler", False, None, True, False),
                          ("dpmpp_2m", False, (64, 32), True, True)],
                         ids=["pg-in-both-passes", "style-guidance", "euler-64x32", "euler-keep-product",
                              "edge-fill-64x32"])
def test_torch_pipeline_makes_bgjax_images(ours, theirs, inputs, sampler, style_guidance, canvas, keep_product,
                                           edge_fill):
    """Identifier, CG, PG, guidance mode and paste-back all agree within 1e-4 (images in [0, 1], product
    pasted back), on the same latents; and each part (identifier, CG, PG, the guidance mode) moves the images by
    ten times the tolerance or more, so a pipeline ignoring any of them fails. (Shown on the PyTorch side, where
    no program is compiled per change, in the first case.)"""
    width, height = canvas or (None, None)
    latents = inputs["wide_latents"] if canvas else inputs["latents"]
    common = dict(reference=inputs["reference"], reference_mask=inputs["reference_mask"], width=width,
                  height=height, style_guidance=style_guidance, keep_product=keep_product, edge_fill=edge_fill,
                  output_type="np")
    want = ours(inputs["product"], inputs["mask"], "lamp", num_images=NUM, steps=STEPS, sampler=sampler,
                latents=latents, **common)
    theirs.scheduler = SCHEDULERS[sampler].from_config(theirs.scheduler.config)  # as a diffusers user switches

    def run(**change) -> np.ndarray:
        return theirs(inputs["product"], inputs["mask"], "lamp", num_images_per_prompt=NUM,
                      num_inference_steps=STEPS, latents=torch.from_numpy(nchw(latents)),
                      **{**common, **change}).images

    got = run()
    err = float(np.abs(got - want).max())
    print(f"BackgroundTorchPipeline vs BackgroundPipeline ({sampler}, {style_guidance=}, {canvas=}): "
          f"max abs {err:.2e}")
    assert got.shape == want.shape == (NUM, *((height, width) if canvas else (32, 32)), 3)
    assert err < 1e-4
    if style_guidance or canvas or keep_product or edge_fill:
        return

    def moved(**change) -> float:
        return float(np.abs(run(**change) - got).max())

    assert moved(lambda_cg=0.0) > 1e-3
    assert moved(reference=None, reference_mask=None) > 1e-3
    assert moved(style_guidance=True) > 1e-3
    assert moved(keep_product=True) > 1e-3
    assert moved(edge_fill=True) > 1e-3
    identifiers = theirs._identifier_ids
    try:  # the placeholder's own embedding instead of the category's identifier
        prompt = theirs.inputs.prompts("lamp")
        theirs._identifier_ids = [int(prompt.input_ids[prompt.identifier_index])] * len(identifiers)
        assert moved() > 1e-3
    finally:
        theirs._identifier_ids = identifiers


def test_export_then_convert_generates_the_same_images(method_model, ours, exported, inputs, tmp_path):
    assert main(["convert", str(exported), "--out", str(tmp_path / "back")]) == 0
    back = BackgroundPipeline.from_pretrained(tmp_path / "back")
    kwargs = dict(reference=inputs["reference"], reference_mask=inputs["reference_mask"], num_images=NUM,
                  steps=STEPS, latents=inputs["latents"], output_type="np")
    np.testing.assert_array_equal(back(inputs["product"], inputs["mask"], "coffee mug", **kwargs),
                                  ours(inputs["product"], inputs["mask"], "coffee mug", **kwargs))
