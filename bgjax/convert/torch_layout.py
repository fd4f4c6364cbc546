"""Flax param trees <-> PyTorch state dicts (diffusers / transformers key names).

The Flax tree already uses diffusers' dotted module names, so a torch key is the tree
path joined by '.', with the leaf renamed (kernel/scale/embedding -> weight) and the
kernel transposed (Dense (in, out) <- Linear (out, in); Conv HWIO <- OIHW). Any other leaf
is a bare torch parameter or buffer and keeps its name (CLIP's `class_embedding`, BatchNorm's
`running_mean`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from bgjax.fileio import CheckpointError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return value
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def _from_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return value
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def torch_key(path: tuple[str, ...]) -> str:
    return ".".join((*path[:-1], _LEAF_TO_TORCH.get(path[-1], path[-1])))


def params_to_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """A Flax param tree -> a torch-layout state dict of contiguous numpy arrays."""
    return {torch_key(path): np.ascontiguousarray(_to_torch(path[-1], np.asarray(v)))
            for path, v in flatten_dict(params).items()}


def state_dict_to_params(state: Mapping[str, np.ndarray], template: Mapping, *, source: str,
                         ignore: Mapping[str, str] | None = None) -> dict:
    """A torch-layout state dict -> a Flax tree shaped like `template` (arrays or ShapeDtypeStructs).

    Every key is accounted for: an unexpected key, a missing key or a wrong shape raises
    CheckpointError naming the key and `source`. `ignore` maps keys that are known not to
    be weights (buffers such as `position_ids`) to the reason they are skipped.
    """
    ignore = ignore or {}
    by_key = {torch_key(path): path for path in flatten_dict(template)}
    unexpected = sorted(k for k in state if k not in by_key and k not in ignore)
    missing = sorted(k for k in by_key if k not in state)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {_clip(unexpected)}")
    if missing:
        problems.append(f"missing keys {_clip(missing)}")
    flat_template = flatten_dict(template)
    out = {}
    for key, path in by_key.items():
        if key not in state:
            continue
        value = _from_torch(path[-1], np.asarray(state[key]))
        want = tuple(flat_template[path].shape)
        if value.shape != want:
            problems.append(f"key {key!r} has shape {tuple(np.shape(state[key]))}, expected "
                            f"{tuple(_to_torch(path[-1], np.empty(want, np.uint8)).shape)}")
            continue
        out[path] = value.astype(np.float32) if value.dtype != np.float32 else value
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    return unflatten_dict(out)


def _clip(keys: list[str], n: int = 8) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
