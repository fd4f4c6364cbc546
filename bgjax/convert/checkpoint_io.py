"""Reading outside weight files safely: safetensors (one file or sharded), torch pickles without running code."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bgjax.fileio import CheckpointError, read_safetensors

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def read_torch_pickle(path: Path) -> dict[str, np.ndarray]:
    """A .bin/.ckpt state dict through torch's weights-only unpickler: no pickled code ever runs."""
    import pickle
    import zipfile

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        blocked = next((line for line in lines if "GLOBAL" in line), None)
        if blocked:
            raise CheckpointError(f"{path}: refused: the file holds pickled code, which bgjax never runs "
                                  f"({blocked})") from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """One weights file, or a sharded safetensors checkpoint through its `.index.json`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(".safetensors.index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a safetensors index ({e})") from None
        state = {}
        for shard in shards:
            state.update(read_safetensors(path.parent / shard))
        return state
    if path.suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch_pickle(path)
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .bin, .ckpt, .pt)")


def find_weights(folder: Path) -> Path:
    """The weights file of a diffusers / transformers component folder, safetensors first."""
    folder = Path(folder)
    for pattern in ("*.safetensors", "*.safetensors.index.json", "*.bin"):
        found = sorted(p for p in folder.glob(pattern) if ".fp16." not in p.name and ".ema." not in p.name)
        if found:
            return found[0]
    raise CheckpointError(f"{folder}: no weights file (*.safetensors or *.bin)")
