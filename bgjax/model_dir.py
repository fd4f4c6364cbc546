"""The bgjax model directory: one folder per component with its config and Flax params.

    MODEL/
      bgjax.json                      format marker, components, provenance
      unet/config.json                the diffusers config, as diffusers wrote it
      unet/params.safetensors         Flax-layout fp32 params, keys = dotted tree paths
      vae/ text_encoder/ controlnet/  likewise (controlnet optional)
      tokenizer/ scheduler/           copied verbatim from the source
      cg/ pg/                         the paper's branches (ControlNet configs and params)
      method.json                     the method's settings and categories (bgjax.method.store)
      identifiers.safetensors         the learned identifier embeddings e_c (rows = categories)

This module depends only on bgjax.models and bgjax.fileio.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from bgjax.fileio import CheckpointError, read_safetensors, write_json, write_safetensors
from bgjax.models.components import COMPONENTS, build, param_shapes
from bgjax.models.configs import read_config_json

FORMAT = "bgjax-model"
PARAMS_FILE = "params.safetensors"


def _dotted(tree: dict) -> dict[str, np.ndarray]:
    return {".".join(path): v for path, v in flatten_dict(tree).items()}


def save_params(folder: Path, config: dict, params: dict, component: str) -> None:
    """`folder/config.json` and `folder/params.safetensors` (fp32, keys = dotted tree paths)."""
    folder = Path(folder)
    write_json(folder / "config.json", config)
    write_safetensors(folder / PARAMS_FILE, {k: np.asarray(v, np.float32) for k, v in _dotted(params).items()},
                      metadata={"format": FORMAT, "component": component})


def save_component(model_dir: Path, kind: str, config: dict, params: dict) -> None:
    save_params(Path(model_dir) / kind, config, params, kind)


def load_component(model_dir: Path, kind: str, dtype: jnp.dtype = jnp.float32,
                   param_dtype: jnp.dtype = jnp.float32, **options):
    """(module, params) of one component. `dtype` is the compute dtype, `param_dtype` the dtype
    the stored fp32 params are cast to (bf16 for frozen models saves half the memory).

    `options` are module fields beyond the config (see `components.build`)."""
    folder = Path(model_dir) / kind
    module = build(kind, read_config_json(folder / "config.json"), dtype, **options)
    return module, load_params(folder, param_shapes(kind, module), param_dtype)


def load_params(folder: Path, shapes: dict, param_dtype: jnp.dtype = jnp.float32) -> dict:
    """`folder/params.safetensors` as a tree shaped like `shapes`; every key and shape is checked."""
    folder = Path(folder)
    stored = read_safetensors(folder / PARAMS_FILE)
    template = _dotted(shapes)
    missing = sorted(set(template) - set(stored))
    unexpected = sorted(set(stored) - set(template))
    if missing or unexpected:
        raise CheckpointError(f"{folder / PARAMS_FILE}: does not match {folder / 'config.json'}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, want in template.items():
        if stored[key].shape != want.shape:
            raise CheckpointError(f"{folder / PARAMS_FILE}: key {key!r} has shape {stored[key].shape}, "
                                  f"expected {want.shape}")
    # Module names contain dots themselves, so the template decides where the tree nests.
    params = {path: stored[".".join(path)].astype(param_dtype, copy=False) for path in flatten_dict(shapes)}
    return unflatten_dict(params)


def write_manifest(model_dir: Path, components: list[str], source: str, provenance: dict | None = None) -> None:
    """`bgjax.json`. `provenance` says, per component (and `identifiers`), the run that trained or
    converted it and the runs of the components it was trained against: {kind: {"run": str,
    "against": {kind: run}}}; by default every component comes from `source`."""
    provenance = provenance or {k: {"run": source} for k in components}
    write_json(Path(model_dir) / "bgjax.json", {"format": FORMAT, "version": 1, "components": sorted(components),
                                                "source": source, "provenance": provenance})


def read_manifest(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not (model_dir / "bgjax.json").is_file():
        raise CheckpointError(f"{model_dir}: not a bgjax model directory (no bgjax.json; "
                              f"convert a diffusers folder with `bgjax convert` first)")
    return read_config_json(model_dir / "bgjax.json")


def components(model_dir: Path) -> list[str]:
    return [k for k in read_manifest(model_dir)["components"] if k in COMPONENTS]


def provenance(model_dir: Path) -> dict:
    """`write_manifest`'s provenance; for a directory written before it was recorded, every component from `source`."""
    manifest = read_manifest(model_dir)
    return manifest.get("provenance") or {k: {"run": manifest.get("source", "unknown")} for k in manifest["components"]}
