"""Shared fixtures: tiny random diffusers pipelines and a tiny CLIP tokenizer, written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tests.torch_reference import CLIP_SD1_TINY, SD1_TINY, VAE_TINY, randomize


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_tokenizer(folder: Path) -> Path:
    """A byte-level CLIP BPE vocabulary with no merges: every character is a token (ids 0-513,
    BOS 512, EOS 513, matching CLIP_SD1_TINY's special token ids)."""
    chars = byte_alphabet()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    return folder


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
    write_tiny_tokenizer(folder / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(folder / "scheduler")
    return folder


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, torch.nn.Module]:
    return tiny_torch_pipeline()


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory, tiny_models) -> Path:
    return save_diffusers_folder(tiny_models, tmp_path_factory.mktemp("diffusers"))
