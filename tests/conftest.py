"""Shared fixtures: tiny random diffusers pipelines and a tiny CLIP tokenizer, written to disk."""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bgjax.convert.diffusers_folder import import_diffusers
from bgjax.method.config import MethodConfig
from bgjax.method.store import save_method
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from tests.torch_reference import (
    CLIP_G_TINY,
    CLIP_L_TINY,
    CLIP_SD1_TINY,
    SD1_TINY,
    SDXL_TINY,
    VAE_SDXL_TINY,
    VAE_TINY,
    randomize,
)


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


def tiny_sdxl_pipeline(seed: int = 0, controlnet: bool = True, unet: dict = SDXL_TINY, text: dict = CLIP_L_TINY,
                       text_2: dict = CLIP_G_TINY) -> dict[str, torch.nn.Module]:
    """An SDXL-structured UNet, SDXL VAE, CLIP-L and OpenCLIP-G (with projection) text encoders and a ControlNet
    made from the UNet (`ControlNetModel.from_unet`, added embedding included), every tensor random."""
    models = {"unet": randomize(UNet2DConditionModel(**unet), seed),
              "vae": randomize(AutoencoderKL(**VAE_SDXL_TINY), seed + 1),
              "text_encoder": randomize(CLIPTextModel(CLIPTextConfig(**text)), seed + 2),
              "text_encoder_2": randomize(CLIPTextModelWithProjection(CLIPTextConfig(**text_2)), seed + 3)}
    if controlnet:
        models["controlnet"] = randomize(ControlNetModel.from_unet(
            models["unet"], conditioning_embedding_out_channels=(8, 16)), seed + 4)
    return models


def save_sdxl_folder(models: dict[str, torch.nn.Module], folder: Path) -> Path:
    """The folder `StableDiffusionXL(ControlNet)Pipeline.save_pretrained` writes, with byte-level tokenizers
    (the second padding with "!", as SDXL's tokenizer_2 does) and SDXL base's scheduler."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizers = {name: CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(folder / f".{name}", **pad)))
                  for name, pad in (("tokenizer", {}), ("tokenizer_2", {"pad_token": "!"}))}
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    pipeline = StableDiffusionXLControlNetPipeline if "controlnet" in models else StableDiffusionXLPipeline
    pipeline(**models, **tokenizers, scheduler=scheduler).save_pretrained(folder)
    for name in tokenizers:
        shutil.rmtree(folder / f".{name}")
    return folder


# The two longest files (about 16 and 10 minutes on a 2-core VM): started first, beside the
# big_memory tests, so that neither is the last to finish.
LONGEST_FILES = ("tests/test_train_meshes.py", "tests/test_device_check.py")


def _file(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def _order(item: pytest.Item) -> tuple:
    big = item.get_closest_marker("big_memory")
    if big is not None:
        return (0, -big.kwargs["weights_gb"])
    return (1,) if _file(item) in LONGEST_FILES else (2,)


# XLA's LLVM optimisation level for every program the suite compiles, here and in its subprocesses (tests/cpu_env.py
# keeps it): what `program.run` samples with on a CPU anyway. The programs are the same (same HLO, bit-identical
# images: tools/bench_cpu_compile.py); compiling them takes about a third less time, and compiling is most of the
# suite (tests/test_train_meshes.py's PG test: 163 s at the default, 99 s at level 1).
XLA_LEVEL = "--xla_backend_optimization_level=1"


def pytest_configure(config: pytest.Config) -> None:
    """Before anything compiles (xdist's workers inherit it)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_LEVEL not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_LEVEL}".strip()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup, pyproject.toml)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test file runs on one worker, in order (module fixtures are built once; test_serve's last test
    stops its server). The big_memory tests run on one worker, one after another, first, the largest first,
    while that worker holds nothing else; the other worker runs the longest files meanwhile."""
    for item in items:
        group = "big_memory" if item.get_closest_marker("big_memory") else _file(item)
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=_order)  # stable: the files keep their order


@pytest.fixture(autouse=True)
def released_heap(request):
    """A big_memory test starts with the worker's caches and freed heap handed back to the system."""
    if request.node.get_closest_marker("big_memory") is not None:
        jax.clear_caches()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    yield


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


METHOD_CATEGORIES = ["rice cooker", "lamp", "coffee mug"]


@pytest.fixture(scope="session")
def method_model(tmp_path_factory) -> Path:
    """A tiny bgjax model (32 px) with CG and PG (random weights everywhere, the zero-initialised output convs
    too, so both branches move the result) and per-category identifiers (random, not the placeholder's)."""
    root = tmp_path_factory.mktemp("method_model")
    models = tiny_torch_pipeline(seed=3, controlnet=False)
    # The UNet's cross-attention takes 32-wide states: a text encoder to match.
    models["text_encoder"] = randomize(CLIPTextModel(CLIPTextConfig(**{**CLIP_SD1_TINY, "hidden_size": 32,
                                                                        "intermediate_size": 64})), seed=5)
    for i, name in enumerate(("cg", "pg")):
        models[name] = randomize(ControlNetModel.from_unet(models["unet"], conditioning_embedding_out_channels=(8, 16)),
                                 seed=30 + i, scale=0.1)
    save_diffusers_folder(models, root / "src")
    import_diffusers(root / "src", root / "model")
    table = np.random.default_rng(0).standard_normal((len(METHOD_CATEGORIES), 32)).astype(np.float32)
    save_method(root / "model", MethodConfig(), METHOD_CATEGORIES, table)
    return root / "model"


@pytest.fixture(scope="session")
def tiny_sdxl_models() -> dict[str, torch.nn.Module]:
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory, tiny_sdxl_models) -> Path:
    return save_sdxl_folder(tiny_sdxl_models, tmp_path_factory.mktemp("sdxl") / "diffusers")
