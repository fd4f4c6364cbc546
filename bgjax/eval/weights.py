"""Metric networks' weights: local PyTorch checkpoints -> `DIR/config.json` + `DIR/params.safetensors`.

    clip       a transformers CLIPModel or CLIPVisionModelWithProjection: a folder with
               config.json, or a .safetensors / .bin file with config.json beside it
    inception  pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or that state dict as safetensors)

Every key of the source is accounted for: an unknown key, a missing key or a wrong shape
raises CheckpointError naming the file and the key; keys that are deliberately not
converted (CLIP's text tower, Inception's classifier) are returned with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bgjax import model_dir
from bgjax.convert.checkpoint_io import find_weights, read_weights
from bgjax.convert.torch_layout import state_dict_to_params
from bgjax.eval.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from bgjax.eval.inception import FID_SIZE, FIDInceptionV3
from bgjax.fileio import CheckpointError
from bgjax.models.configs import ConfigError, read_config_json

INCEPTION_CONFIG = {"model_type": "fid_inception_v3"}
_CLIP_TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale")


@functools.lru_cache(maxsize=8)  # tracing InceptionV3 takes seconds on a CPU; modules hash by value
def _shapes(module: nn.Module, image_size: int, channels: int = 3) -> dict:
    return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, channels)))["params"]


def clip_vision_params(state: Mapping[str, np.ndarray], config: CLIPVisionConfig,
                       source: str) -> tuple[dict, dict[str, str]]:
    """A CLIP state dict -> (Flax params, {ignored key: reason})."""
    ignored = {k: "CLIP text tower, not used for image embeddings" for k in state if k.startswith(_CLIP_TEXT_TOWER)}
    ignored.update({k: "position-id buffer, recomputed" for k in state if k.endswith("embeddings.position_ids")})
    shapes = _shapes(CLIPVisionModelWithProjection(config), config.image_size, config.num_channels)
    return state_dict_to_params(state, shapes, source=source, ignore=ignored), ignored


def inception_params(state: Mapping[str, np.ndarray], source: str) -> tuple[dict, dict[str, str]]:
    """pytorch-fid's FID Inception state dict -> (Flax params, {ignored key: reason})."""
    ignored = {k: "1008-way classifier, FID uses the 2048-d pool features" for k in ("fc.weight", "fc.bias")
               if k in state}
    ignored.update({k: "BatchNorm step counter, not a weight" for k in state if k.endswith(".num_batches_tracked")})
    return state_dict_to_params(state, _shapes(FIDInceptionV3(), FID_SIZE), source=source, ignore=ignored), ignored


def _clip_source(src: Path, config: Path | None) -> tuple[Path, Path]:
    """(weights file, config.json) of a transformers folder or of a lone weights file."""
    if src.is_dir():
        return find_weights(src), config or src / "config.json"
    return src, config or src.parent / "config.json"


def convert_metric_weights(kind: str, src: Path, out: Path, config: str | Path | None = None) -> dict[str, str]:
    """Convert `src` for metric `kind` ("clip" or "inception") into `out`; returns the ignored keys."""
    src, out = Path(src), Path(out)
    if kind == "clip":
        weights, config_path = _clip_source(src, config and Path(config))
        try:
            cfg = CLIPVisionConfig.from_dict(read_config_json(config_path))
        except ConfigError as e:
            raise CheckpointError(f"{config_path}: {e}") from None
        params, ignored = clip_vision_params(read_weights(weights), cfg, str(weights))
        model_dir.save_params(out, cfg.raw, params, "clip_vision")
    elif kind == "inception":
        params, ignored = inception_params(read_weights(src), str(src))
        model_dir.save_params(out, {**INCEPTION_CONFIG, "source": src.name}, params, "fid_inception_v3")
    else:
        raise ValueError(f"kind: {kind!r}, expected 'clip' or 'inception'")
    return ignored


def load_clip_vision(path: str | Path, dtype: jnp.dtype = jnp.float32) -> tuple[CLIPVisionModelWithProjection, dict]:
    """(module, params) from a folder written by `convert_metric_weights("clip", ...)`."""
    path = Path(path)
    module = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(read_config_json(path / "config.json")), dtype)
    return module, model_dir.load_params(path, _shapes(module, module.config.image_size, module.config.num_channels))


def load_inception(path: str | Path, dtype: jnp.dtype = jnp.float32) -> tuple[FIDInceptionV3, dict]:
    """(module, params) from a folder written by `convert_metric_weights("inception", ...)`."""
    path = Path(path)
    if read_config_json(path / "config.json").get("model_type") != INCEPTION_CONFIG["model_type"]:
        raise ConfigError(f"{path / 'config.json'}: model_type is not {INCEPTION_CONFIG['model_type']!r}")
    module = FIDInceptionV3(dtype=dtype)
    return module, model_dir.load_params(path, _shapes(module, FID_SIZE))
