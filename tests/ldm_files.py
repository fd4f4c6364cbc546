"""Single-file (original LDM / CompVis) Stable Diffusion checkpoints for fixtures, laid out as the files
users have: those of the original releases and of diffusers' scripts/convert_diffusers_to_original_stable_
diffusion.py (fp32 or --half; .safetensors, or a .ckpt holding {"state_dict": ...}). SD-1's text encoder is
`cond_stage_model.transformer.text_model.*`, SD-2's OpenCLIP `cond_stage_model.model.*` (q, k and v packed
in `attn.in_proj_*`) with the blocks diffusers keeps and no projection head, as diffusers' script writes it
(the original SD-2 release also stores OpenCLIP's last block and `text_projection`).

SDXL base files (Stability's sd_xl_base_1.0.safetensors, SGM's layout) hold the UNet with its added
embedding as `label_emb.0.0` / `label_emb.0.2`, and SGM's conditioner: CLIP ViT-L in transformers' names
under `conditioner.embedders.0.transformer.text_model.*` (its position-id buffer too) and OpenCLIP
ViT-bigG under `conditioner.embedders.1.model.*` with all its blocks, its `text_projection` (width x dim,
applied as x @ P) and `logit_scale`.

The layout is not taken on trust: `tests/test_convert_sources.py` reads every fixture back with diffusers'
own single-file converters (`diffusers.loaders.single_file_utils`) and gets the original weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from bgjax.convert.ldm import diffusers_to_ldm
from bgjax.convert.ldm_text import OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX

_OPEN_CLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_text(text_encoder: dict[str, np.ndarray], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, np.ndarray]:
    """A transformers CLIPTextModel(WithProjection) state dict (keys with or without `text_model.`) in OpenCLIP's
    names under `prefix`; a projection becomes OpenCLIP's `text_projection` (transposed) beside `logit_scale`."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.items() if not k.endswith("position_ids")}
    out = {}
    if "text_projection.weight" in state:
        out["text_projection"] = np.ascontiguousarray(state.pop("text_projection.weight").T)
        out["logit_scale"] = np.array(np.log(1 / 0.07), np.float32)
    out |= {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias")}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src = f"encoder.layers.{i}."
        for param in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = np.concatenate(
                [state.pop(f"{src}self_attn.{n}_proj.{param}") for n in "qkv"])
            for ours, theirs in _OPEN_CLIP_NAMES.items():
                out[f"transformer.resblocks.{i}.{theirs}.{param}"] = state.pop(f"{src}{ours}.{param}")
    if state:
        raise ValueError(f"not a CLIPTextModel: {sorted(state)[:3]}")
    return {prefix + k: v for k, v in out.items()}


def _numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in model.state_dict().items()}


def _save(state: dict[str, np.ndarray], path: Path, half: bool) -> Path:
    state = {k: v.astype(np.float16) if half and v.dtype == np.float32 else v for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, path)
    return path


def sd_single_file(models: dict[str, torch.nn.Module], path: Path, text: str = "clip", half: bool = False,
                   extra: dict[str, np.ndarray] | None = None) -> Path:
    """`models` (diffusers UNet, AutoencoderKL, transformers CLIPTextModel) as one single-file checkpoint at
    `path`; `text` "clip" (SD-1) or "open_clip" (SD-2)."""
    te = {k: v.astype(np.float32) for k, v in _numpy(models["text_encoder"]).items()}
    state = diffusers_to_ldm(_numpy(models["unet"]), _numpy(models["vae"]), {} if text == "open_clip" else te,
                             dict(models["unet"].config), dict(models["vae"].config))
    if text == "open_clip":
        state.update(open_clip_text(te))
    state.update(extra or {})
    return _save(state, path, half)


def sdxl_single_file(models: dict[str, torch.nn.Module], path: Path, half: bool = False,
                     extra: dict[str, np.ndarray] | None = None) -> Path:
    """`models` (an SDXL UNet, AutoencoderKL, CLIPTextModel and CLIPTextModelWithProjection) as one SDXL base
    single file at `path`, laid out as Stability's."""
    state = diffusers_to_ldm(_numpy(models["unet"]), _numpy(models["vae"]), {}, dict(models["unet"].config),
                             dict(models["vae"].config))
    for key, value in _numpy(models["text_encoder"]).items():
        rel = key.removeprefix("text_model.")
        # transformers 5 keeps no position-id buffer; the released file holds one (int64)
        state[SDXL_CLIP_PREFIX + "text_model." + rel] = value
    state[SDXL_CLIP_PREFIX + "text_model.embeddings.position_ids"] = np.arange(
        models["text_encoder"].config.max_position_embeddings, dtype=np.int64)[None]
    state.update(open_clip_text(_numpy(models["text_encoder_2"]), SDXL_OPEN_CLIP_PREFIX))
    state.update(extra or {})
    return _save(state, path, half)
