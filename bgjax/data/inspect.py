"""`bgjax data inspect`: what a record folder holds, and a picture of it."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from bgjax.data.augment import CropConfig, PGAugmentConfig, crop_resize, draw_pg_batch
from bgjax.data.convert import read_manifest
from bgjax.data.example import decode_example
from bgjax.data.images import decode_mask, decode_rgb
from bgjax.data.pg_render import pg_render
from bgjax.data.records import read_records


def _tile(rows: list[list[np.ndarray]]) -> Image.Image:
    return Image.fromarray(np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0))


def inspect_dataset(data_dir: Path, num: int = 16, resolution: int = 128, seed: int = 0) -> str:
    """Counts per category and rejection reason, and `inspect.png` in `data_dir`: per sample the
    image, its mask, the training crop, and PG's perturbed reference with its mask."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    # Only the first `num` records are read: the counts are in the manifest.
    records = (r for shard in manifest["shards"] for r in read_records(data_dir / shard["path"]))
    examples = (decode_example(r) for r in itertools.islice(records, num))
    samples = [(decode_rgb(ex["image"][0]), decode_mask(ex["mask"][0])) for ex in examples]
    rows = []
    rng = np.random.default_rng(seed)
    crop_cfg, pg_cfg = CropConfig(resolution=resolution), PGAugmentConfig()
    crops = [crop_resize(image, mask, rng, crop_cfg) for image, mask in samples]
    if crops:  # the training path: parameters drawn as the loader does, rendered as the trainer does
        images, masks = np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])
        conds, pg_masks = (np.asarray(a) for a in pg_render(
            {"image": images, "pg_partner_image": np.roll(images, -1, axis=0), "mask": masks,
             **draw_pg_batch(masks, rng, pg_cfg)}))
    for i, (image, mask) in enumerate(crops):
        original = np.asarray(Image.fromarray(samples[i][0]).resize((resolution, resolution)))
        original_mask = np.asarray(Image.fromarray(samples[i][1]).resize((resolution, resolution)))
        rows.append([original, np.stack([original_mask] * 3, -1), image, np.stack([mask] * 3, -1),
                     ((conds[i] + 1) * 127.5).clip(0, 255).astype(np.uint8),
                     np.stack([pg_masks[i].astype(np.uint8) * 255] * 3, -1)])
    if rows:
        _tile(rows).save(data_dir / "inspect.png")
    reasons = collections.Counter(r["reason"].split(":")[-1].strip() for r in manifest["rejected"])
    lines = [f"{data_dir}: {manifest['num_written']} records of {manifest['num_inputs']} inputs "
             f"({manifest['format']}, {len(manifest['shards'])} shards)",
             "categories: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest["category_counts"].items()))]
    lines += [f"rejected {n}: {reason}" for reason, n in reasons.most_common()]
    if rows:
        lines.append(f"grid: {data_dir / 'inspect.png'} (image, mask, training crop, crop mask, PG reference, "
                     f"PG mask)")
    return "\n".join(lines)
