"""Metric features of many images of any sizes: background CLIP embeddings and FID Inception features,
batched, jitted and sharded over the local devices.

A dataset's images (and images generated at their products' sizes) differ in size, and a jitted program
per size would recompile without end. So the size-dependent part runs on the host, per image, in float64
with the weights of `bgjax.eval.resize`:

- `clip_pixels`: the product masked to CLIP's mean colour, then CLIP's resize (shorter side to S, each
  pass rounded to uint8 levels) and centre crop: what `clip_similarity.background_embeddings` does in JAX.
- `fid_pixels`: clean-fid's float resize to 299 x 299: what `fid.clean_resize` does in JAX.

The networks then run on fixed-shape batches through those same jitted functions
(`background_embeddings`, `inception_features`), whose own resizes, masking and rounding are no-ops on
inputs that already have the network's size and uint8 levels: one compiled program per network. A batch
is a multiple of the device count, placed with a NamedSharding over a 1-D "data" mesh (params
replicated); the last batch is padded by repeating its last image and the padding's outputs dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from bgjax.eval.clip_similarity import background_embeddings
from bgjax.eval.clip_vision import CLIP_MEAN
from bgjax.eval.fid import inception_features
from bgjax.eval.inception import FID_SIZE
from bgjax.eval.resize import bicubic_matrix


def _resize(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """One PIL-BICUBIC pass along `axis` in float64 (skipped when the size does not change, as PIL does)."""
    if x.shape[axis] == size:
        return x
    return np.moveaxis(np.tensordot(bicubic_matrix(x.shape[axis], size), x, axes=((1,), (axis,))), 0, axis)


def clip_pixels(image: np.ndarray, mask: np.ndarray | None, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) mask in [0, 1] (1 = product; None: nothing masked) -> (S, S, 3) float32
    at uint8 levels: `preprocess(mask_products(...))` of `bgjax.eval` before its normalisation."""
    x = np.asarray(image, np.float64)
    if mask is not None:
        m = np.asarray(mask, np.float64)[..., None]
        x = x * (1 - m) + 255.0 * np.asarray(CLIP_MEAN) * m
    h, w = x.shape[:2]
    new_long = int(image_size * max(h, w) / min(h, w))
    new_h, new_w = (new_long, image_size) if w <= h else (image_size, new_long)
    x = np.clip(np.round(_resize(x, new_w, axis=1)), 0, 255)  # width first, as PIL
    x = np.clip(np.round(_resize(x, new_h, axis=0)), 0, 255)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    return x[top:top + image_size, left:left + image_size].astype(np.float32)


def fid_pixels(image: np.ndarray, size: int = FID_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 image -> (size, size, 3) float32 in [0, 255]: clean-fid's "clean" resize."""
    return _resize(_resize(np.asarray(image, np.float64), size, axis=1), size, axis=0).astype(np.float32)


class FeatureExtractor:
    """`extractor(pairs)` -> {"clip": (N, projection_dim) unit embeddings, "inception": (N, 2048)}.

    `clip` and `inception` are (module, params) from `bgjax.eval.weights.load_clip_vision` /
    `load_inception`, or None to leave that network out.
    """

    def __init__(self, clip: tuple | None = None, inception: tuple | None = None, batch_size: int = 32):
        self.mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
        devices = self.mesh.size
        self.batch_size = -(-max(1, batch_size) // devices) * devices
        self.batched = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.clip = None if clip is None else (clip[0], jax.device_put(clip[1], replicated))
        self.inception = None if inception is None else (inception[0], jax.device_put(inception[1], replicated))

    def _run(self, name: str, pixels: list[np.ndarray]) -> jax.Array:
        n = len(pixels)
        batch = np.stack(pixels + [pixels[-1]] * (self.batch_size - n))  # one shape: one compiled program
        x = jax.device_put(batch, self.batched)
        if name == "clip":
            module, params = self.clip
            zeros = jax.device_put(np.zeros(batch.shape[:3], np.float32), self.batched)
            return background_embeddings(module, params, x, zeros)[:n]
        module, params = self.inception
        return inception_features(module, params, x)[:n]

    def __call__(self, pairs: Iterable[tuple[np.ndarray, np.ndarray | None]], clip: bool = True,
                 inception: bool = True, total: int | None = None, desc: str | None = None) -> dict[str, np.ndarray]:
        """Features of (image (H, W, 3) uint8, product mask (H, W) in [0, 1] or None) pairs. The mask only
        matters for CLIP (background embeddings); FID sees the whole image. A network that is None is skipped."""
        names = [k for k, want in (("clip", clip), ("inception", inception)) if want and getattr(self, k) is not None]
        if not names:
            return {}
        pending: dict[str, list[np.ndarray]] = {k: [] for k in names}
        outputs: dict[str, list[jax.Array]] = {k: [] for k in names}

        def flush() -> None:
            for k in names:
                if pending[k]:
                    outputs[k].append(self._run(k, pending[k]))  # dispatched asynchronously
                    pending[k] = []

        for image, mask in tqdm(pairs, total=total, desc=desc, unit="img"):
            if "clip" in names:
                pending["clip"].append(clip_pixels(image, mask, self.clip[0].config.image_size))
            if "inception" in names:
                pending["inception"].append(fid_pixels(image))
            if len(pending[names[0]]) == self.batch_size:
                flush()
        flush()
        dims = {"clip": self.clip[0].config.projection_dim if self.clip else 0, "inception": 2048}
        return {k: np.concatenate([np.asarray(o, np.float32) for o in outputs[k]]) if outputs[k]
                else np.zeros((0, dims[k]), np.float32) for k in names}
