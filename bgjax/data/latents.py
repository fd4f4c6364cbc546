"""Optional latent cache: records with the VAE posterior precomputed, so CG training skips the encoder.

The crop is fixed when caching (drawn once per record from `seed`, no flip), because the
latents belong to one crop; the cropped image and mask are stored too, since CG's condition
`I * M` is taken at full resolution, and so is where the crop came from (SDXL's time ids). The
posterior's mean and log-variance are kept (fp16), so training still samples z = mean + std * noise
as it would from the encoder.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bgjax import model_dir
from bgjax.data import records
from bgjax.data.augment import CropConfig, crop_encoded, to_float
from bgjax.data.convert import MANIFEST, read_manifest, sha256_file
from bgjax.data.example import decode_example, encode_example
from bgjax.data.images import encode_png
from bgjax.fileio import write_json


def cache_latents(data_dir: Path, model: Path, out: Path, resolution: int = 512, batch_size: int = 8,
                  seed: int = 0) -> dict:
    """Write `out/` with the records of `data_dir` cropped to `resolution` plus their latents."""
    data_dir, out = Path(data_dir), Path(out)
    manifest = read_manifest(data_dir)
    vae, params = model_dir.load_component(model, "vae")
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    crop_cfg = CropConfig(resolution=resolution, flip_probability=0.0)
    out.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    bar = tqdm(total=manifest["num_written"], desc="cache latents", unit="img")
    for shard in manifest["shards"]:
        path = out / shard["path"]
        tmp = path.with_name(path.name + ".tmp")
        w, count, pending = records.writer(tmp, manifest["format"]), 0, []

        def flush(w=w, pending=pending):
            images = np.stack([to_float(p["crop"].image) for p in pending])
            mean, logvar = (np.asarray(a, np.float16) for a in encode(params, jnp.asarray(images)))
            for p, m, lv in zip(pending, mean, logvar, strict=True):
                crop = p["crop"]
                w.write(encode_example({**p["features"], "image": encode_png(crop.image),
                                        "mask": encode_png(crop.mask), "height": resolution, "width": resolution,
                                        "original_size": list(crop.original_size),
                                        "crop_top_left": list(crop.crop_top_left),
                                        "latent_mean": m.tobytes(), "latent_logvar": lv.tobytes(),
                                        "latent_shape": list(m.shape)}))
            bar.update(len(pending))
            pending.clear()

        for record in records.read_records(data_dir / shard["path"]):
            ex = decode_example(record)
            rng = np.random.default_rng([seed, index])
            crop = crop_encoded(ex["image"][0], ex["mask"][0], rng, crop_cfg)
            features = {k: v for k, v in ex.items() if k not in ("image", "mask", "height", "width")}
            pending.append({"features": features, "crop": crop})
            index, count = index + 1, count + 1
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        w.close()
        tmp.replace(path)
        shards.append({"path": path.name, "num_records": count, "sha256": sha256_file(path)})
    bar.close()
    cached = {**manifest, "shards": shards,
              "latents": {"resolution": resolution, "seed": seed, "vae": str(Path(model).resolve()),
                          "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor}}
    write_json(out / MANIFEST, cached)
    return cached


def decode_latents(ex: dict) -> dict[str, np.ndarray]:
    """The cached posterior of one decoded record: latent_mean and latent_logvar, float32."""
    shape = tuple(ex["latent_shape"])
    return {name: np.frombuffer(ex[name][0], np.float16).reshape(shape).astype(np.float32)
            for name in ("latent_mean", "latent_logvar")}
