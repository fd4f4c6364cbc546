"""Sample grids during training: the current weights generate backgrounds for a fixed validation
set (the first records of the data, one per category where possible), one row per product:
product | generated (| reference for PG). Written to WORKDIR/samples/ and TensorBoard."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from bgjax.data.convert import read_manifest
from bgjax.data.example import decode_example
from bgjax.data.images import decode_mask, decode_rgb
from bgjax.data.records import read_records
from bgjax.sampling.pipeline import BackgroundPipeline, Models
from bgjax.train.models import StageModels


def validation_set(data_dir: Path, num: int) -> list[dict]:
    """The first record of each category, then further records, up to `num` (product, mask, category)."""
    data_dir = Path(data_dir)
    records = (decode_example(r) for shard in read_manifest(data_dir)["shards"]
               for r in read_records(data_dir / shard["path"]))
    chosen, seen = [], set()
    for ex in itertools.islice(records, 64 * num):
        category = ex["category"][0].decode()
        if category not in seen or len(seen) >= num:
            seen.add(category)
            chosen.append({"product": decode_rgb(ex["image"][0]), "mask": decode_mask(ex["mask"][0]),
                           "category": category})
        if len(chosen) == num:
            break
    return chosen


def sample_grid(models: StageModels, params: dict, items: list[dict], steps: int, seed: int = 0) -> Image.Image:
    """Generate with host `params` (every component's) and tile the rows. PG rows use the next item
    as the style reference."""
    denoiser = {k: params[k] for k in ("unet", "cg", "pg") if k in params}
    pipe = BackgroundPipeline(Path("."), Models(models.denoiser, models.text_encoder, models.vae),
                              {"denoiser": denoiser, "text_encoder": params["text_encoder"], "vae": params["vae"],
                               "identifiers": params.get("identifiers")},
                              models.prompts.tokenizer, models.configs["scheduler"], models.method, models.categories)
    rows = []
    for i, item in enumerate(items):
        reference = items[(i + 1) % len(items)] if models.denoiser.pg is not None else None
        image = pipe(product=item["product"], mask=item["mask"], category=item["category"],
                     reference=reference and reference["product"], reference_mask=reference and reference["mask"],
                     num_images=1, seed=seed, steps=steps)[0]
        side = pipe.resolution
        row = [Image.fromarray(item["product"]).resize((side, side)), image.resize((side, side))]
        if reference is not None:
            row.append(Image.fromarray(reference["product"]).resize((side, side)))
        rows.append(np.concatenate([np.asarray(r.convert("RGB")) for r in row], axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))
