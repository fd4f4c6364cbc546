"""Loader throughput: JPEG records -> 512 px crops with PG augmentation, img/s and img/s per CPU core.

    python tools/bench_data.py [--num 256] [--resolution 512] [--source-scale 1.3] [--no-jpeg-draft]
                               [--workers 0 2] [--pg on off] [--repeat 8]

Writes a temporary catalogue of JPEG photos (by default 1.3x the training resolution, like
BG60k's ~800 px images scaled to 512; larger ones exercise the reduced-scale JPEG decoding of
crops at least twice the resolution, `CropConfig.jpeg_draft`), converts it to ArrayRecord and times the grain pipeline
(decode, product-preserving crop + resize, flip, prompt lookup, PG parameter draw, batching).
workers=0 runs in one process (grain's reader threads); workers=N uses N grain worker processes.

Per setting it prints wall img/s and img/s per CPU core = images / CPU seconds that this
process and its worker children consumed during the timed window (psutil: live children are
read directly, since getrusage(RUSAGE_CHILDREN) counts only exited ones). PG's pixel work runs
on the accelerator (`bgjax.data.pg_render`), so it is not part of these numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from bgjax.data.augment import CropConfig, PGAugmentConfig
from bgjax.data.convert import write_dataset
from bgjax.data.pipeline import PipelineConfig, make_dataset
from bgjax.data.sources import list_folder


def make_catalogue(root: Path, num: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    yy, xx = np.mgrid[:size, :size]
    rows = ["image,category"]
    for i in range(num):
        # Smooth gradients plus noise: JPEG sizes like a photo's, not like pure noise or flat colour.
        base = (np.sin(xx / (20 + i % 7)) * 60 + yy / size * 120 + 40)[..., None] * rng.uniform(0.6, 1.0, 3)
        photo = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(photo).save(root / "img" / f"{i:05d}.jpg", quality=90)
        cy, cx, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [int(rng.integers(size // 8, size // 4))]
        Image.fromarray((((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * 255).astype(np.uint8)).save(
            root / "mask" / f"{i:05d}.png")
        rows.append(f"{i:05d}.jpg,category {i % 10}")
    (root / "cats.csv").write_text("\n".join(rows) + "\n")
    out = root / "records"
    write_dataset(list_folder(root / "img", root / "cats.csv", root / "mask"), out, records_per_shard=64)
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, its live children and its reaped children."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, children_user, children_system (reaped)
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # exited since the listing: counted once reaped
            total += sum(child.cpu_times()[:2])
    return total


def measure(data: Path, cfg: PipelineConfig, prompts: dict, batches: int, repeats: int) -> tuple[float, float]:
    """Best (wall img/s, img/s per CPU core) over `repeats` windows of `batches` batches, after 3
    untimed ones: other work on the machine only ever slows a window down."""
    it = iter(make_dataset(data, cfg, prompts))
    for _ in range(3):  # start-up, worker spawn and prefetch buffers outside the timing
        next(it)
    images = batches * cfg.batch_size
    best_wall = best_core = 0.0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            next(it)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        best_wall, best_core = max(best_wall, images / wall), max(best_core, images / cpu)
    return best_wall, best_core


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--source-scale", type=float, default=1.3, help="photo side / resolution")
    p.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false", help="always decode JPEGs fully")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=20, help="timed batches per window, after 3 untimed")
    p.add_argument("--repeat", type=int, default=8, help="timed windows per setting; the best is reported")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--pg", nargs="+", choices=["on", "off"], default=["on", "off"],
                   help="with PG inputs (stage 2) and/or without (stage 1)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = int(args.resolution * args.source_scale)
        data = make_catalogue(Path(tmp), args.num, source)
        prompts = {"input_ids": np.zeros((10, 77), np.int32), "fg_tokens": np.ones((10, 77), np.float32),
                   "bg_tokens": np.ones((10, 77), np.float32), "identifier_index": np.zeros(10, np.int32)}
        print(f"{args.num} JPEG records at {source} px -> {args.resolution} px, "
              f"batch {args.batch}, best of {args.repeat} x {args.batches} timed batches, {psutil.cpu_count()} CPUs")
        for pg in args.pg:
            for workers in args.workers:
                cfg = PipelineConfig(batch_size=args.batch, seed=0, workers=workers,
                                     crop=CropConfig(resolution=args.resolution, jpeg_draft=args.jpeg_draft),
                                     pg=PGAugmentConfig() if pg == "on" else None)
                wall, per_core = measure(data, cfg, prompts, args.batches, args.repeat)
                print(f"PG {pg:3s} workers={workers}: {wall:6.1f} img/s wall, {per_core:6.1f} img/s per CPU core")


if __name__ == "__main__":
    main()
