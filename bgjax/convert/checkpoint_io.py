"""Reading and writing weight files safely: safetensors, and torch pickles without running code."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bgjax.convert.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        # The flax framework hands back bf16 too, which numpy's cannot.
        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


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


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` then rename into place, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # mkstemp would make the file 0600; opened with 0666 the umask decides, like any new file
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))
