"""Shared fixtures: tiny random diffusers pipelines and a tiny CLIP tokenizer, written to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from bgjax.models.byte_tokenizer import write_byte_tokenizer
from tests.torch_reference import CLIP_SD1_TINY, SD1_TINY, VAE_TINY, randomize


def tiny_torch_pipeline(seed: int = 0, controlnet: bool = True) -> dict[str, torch.nn.Module]:
    unet = randomize(UNet2DConditionModel(**SD1_TINY), seed)
    models = {
        "unet": unet,
        "vae": randomize(AutoencoderKL(**VAE_TINY), seed + 1),
        "text_encoder": randomize(CLIPTextModel(CLIPTextConfig(**CLIP_SD1_TINY)), seed + 2),
    }
    if controlnet:
        models["controlnet"] = randomize(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)),
                                         seed + 3)
    return models


def save_diffusers_folder(models: dict[str, torch.nn.Module], folder: Path) -> Path:
    for name, model in models.items():
        model.save_pretrained(folder / name)
    write_byte_tokenizer(folder / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(folder / "scheduler")
    return folder


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> Path:
    """One persistent compilation cache for the session's `bgjax` commands and their subprocesses (not the
    user's): programs compiled by one test load in the next."""
    os.environ.setdefault("BGJAX_COMPILE_CACHE", str(tmp_path_factory.mktemp("jax_compile_cache")))
    return Path(os.environ["BGJAX_COMPILE_CACHE"])


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, torch.nn.Module]:
    return tiny_torch_pipeline()


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory, tiny_models) -> Path:
    return save_diffusers_folder(tiny_models, tmp_path_factory.mktemp("diffusers"))
