"""Listings -> record shards + manifest.json, in parallel, resumable, never losing an input silently.

Every input ends up either in a shard or in `manifest["rejected"]` with its reason, so
`num_inputs == num_written + len(rejected)` always holds.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from bgjax.data import records
from bgjax.data.example import encode_example
from bgjax.data.images import Rejected, encode_jpeg, encode_png, load_image, load_mask
from bgjax.data.sources import InputItem, Listing
from bgjax.fileio import write_json

MANIFEST = "manifest.json"


def _image_bytes(path: Path, array) -> bytes:
    """The file's own bytes when they already are an upright RGB JPEG (no generation loss), else
    a re-encoding: JPEG for JPEG sources, PNG (lossless) for the rest."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        upright = img.getexif().get(0x0112, 1) == 1
        if img.format == "JPEG" and img.mode == "RGB" and upright:
            return data
        return encode_jpeg(array) if img.format == "JPEG" else encode_png(array)


def _load_pair(image: Path, mask: Path | None, what: str, threshold: int) -> tuple[bytes, bytes, tuple[int, int]]:
    array, pil = load_image(image, f"{what} {image.name}")
    if mask is None:
        if "A" not in pil.getbands():
            raise Rejected(f"{what} {image.name}: no mask file and no alpha channel")
        mask_array = load_mask(image, array.shape[:2], f"{what} {image.name} (alpha)", threshold)
    else:
        mask_array = load_mask(mask, array.shape[:2], f"mask {mask.name}", threshold)
    return _image_bytes(image, array), encode_png(mask_array), array.shape[:2]


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (write records with `bgjax data ...` first)")
    return json.loads(path.read_text())


def record_features(item: InputItem, category_id: int) -> dict:
    """The features of one record (encoded image and mask, category, id, size, source, and the reference of
    a pair); raises Rejected with the reason."""
    if item.synthetic is not None:
        from bgjax.data.synthetic import make_sample

        index, seed, size = item.synthetic
        s = make_sample(index, seed=seed, size=size, category=item.category)
        image, mask, (h, w) = encode_png(s.image), encode_png(s.mask), s.image.shape[:2]
    else:
        image, mask, (h, w) = _load_pair(item.image, item.mask, "image", item.mask_threshold)
    features = {"image": image, "mask": mask, "category": item.category, "category_id": category_id,
                "id": item.id, "height": h, "width": w, "source": item.source}
    if item.ref_image is not None:
        ref_image, ref_mask, _ = _load_pair(item.ref_image, item.ref_mask, "reference", item.mask_threshold)
        features.update(ref_id=item.ref_id, ref_image=ref_image, ref_mask=ref_mask)
    return features


def features_or_rejection(job: tuple[InputItem, int]) -> tuple[dict | None, dict | None]:
    """(features, None) for an (item, category id) that decodes, else (None, its rejection with the reason):
    one bad file never stops a conversion."""
    item, category_id = job
    try:
        return record_features(item, category_id), None
    except Rejected as e:
        reason = str(e)
    except Exception as e:
        reason = f"unexpected {type(e).__name__}: {e}"
    return None, {"input": str(item.image or item.id), "id": item.id, "reason": reason}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(job: tuple[Path, str, list[InputItem], dict[str, int]]) -> dict:
    path, fmt, items, vocab = job
    tmp = path.with_name(path.name + ".tmp")
    w, ids, rejected, counts = records.writer(tmp, fmt), [], [], {}
    try:
        for item in items:
            features, rejection = features_or_rejection((item, vocab[item.category]))
            if rejection is not None:
                rejected.append(rejection)
                continue
            w.write(encode_example(features))
            ids.append(item.id)
            counts[item.category] = counts.get(item.category, 0) + 1
    finally:
        w.close()
    os.replace(tmp, path)
    done = {"path": path.name, "num_records": len(ids), "sha256": sha256_file(path), "ids": ids, "rejected": rejected,
            "category_counts": counts}
    write_json(path.with_name(path.name + ".done.json"), done)
    return done


def _finished(path: Path, items: list[InputItem]) -> dict | None:
    """A shard written by an earlier run of the same conversion, verified by its checksum."""
    marker = path.with_name(path.name + ".done.json")
    if not (path.is_file() and marker.is_file()):
        return None
    done = json.loads(marker.read_text())
    accounted = sorted(done["ids"] + [r["id"] for r in done["rejected"]])
    if accounted != sorted(i.id for i in items) or done["sha256"] != sha256_file(path):
        return None
    return done


def write_dataset(listing: Listing, out: Path, fmt: records.Format = "arrayrecord", split: str = "train",
                  records_per_shard: int = 1000, workers: int | None = None) -> dict:
    """Write `listing` as record shards under `out` plus `manifest.json`; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {name: i for i, name in enumerate(sorted({item.category for item in listing.items}))}
    chunks = [listing.items[i:i + records_per_shard] for i in range(0, len(listing.items), records_per_shard)]
    n = len(chunks)
    jobs = [(out / f"{split}-{k:05d}-of-{n:05d}{records.SUFFIX[fmt]}", fmt, chunk, vocab)
            for k, chunk in enumerate(chunks)]
    results, todo = {}, []
    for job in jobs:
        done = _finished(job[0], job[2])
        if done is None:
            todo.append(job)
        else:
            results[job[0].name] = done
    bar = tqdm(total=len(listing.items), desc=f"write {split}", unit="img")
    bar.update(sum(r["num_records"] + len(r["rejected"]) for r in results.values()))
    with executor(workers or min(len(todo), os.cpu_count() or 1) or 1) as pool:
        for done in pool.map(_write_shard, todo):
            results[done["path"]] = done
            bar.update(done["num_records"] + len(done["rejected"]))
    bar.close()
    shards = [results[job[0].name] for job in jobs]
    manifest = {
        "format": fmt, "split": split, "num_inputs": listing.num_inputs,
        "num_written": sum(s["num_records"] for s in shards),
        "rejected": listing.rejected + [r for s in shards for r in s["rejected"]],
        "unmatched": listing.unmatched,
        "shards": [{"path": s["path"], "num_records": s["num_records"], "sha256": s["sha256"]} for s in shards],
        "categories": vocab,
        "category_counts": {name: sum(s["category_counts"].get(name, 0) for s in shards) for name in vocab},
    }
    if manifest["num_inputs"] != manifest["num_written"] + len(manifest["rejected"]):
        raise AssertionError("an input was neither written nor rejected")  # a bug, never bad data
    write_json(out / MANIFEST, manifest)
    return manifest


def executor(workers: int):
    """A pool of `workers` processes, or this process when there is one."""
    if workers <= 1:
        return _Serial()
    # spawn, not fork: the caller may hold JAX's threads.
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


class _Serial:
    """The executor interface, in this process (workers=1: easier to debug, no pickling)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs, chunksize: int = 1):
        return map(fn, jobs)
