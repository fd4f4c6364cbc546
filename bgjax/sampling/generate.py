"""`bgjax generate`: one product, or a manifest of products, to images (PNG, JPEG or WebP) with JSON sidecars.

Outputs are `OUT/{product stem}_{hash}_{k}.png` (`.jpg`, `.webp` with `--format`) + `.json`; the hash covers
the item's inputs (paths as written and the files' contents, category) and the `GenerationSettings` (model
contents, sampler, steps, guidance, lambdas, size or width x height, dtype, prompts, seed, file format and
quality, ...), so a rerun skips exactly the items whose images and sidecars all exist for these settings and
regenerates any other. A manifest's broken lines are reported with their line number and reason on stderr and
in `OUT/errors.jsonl` (rewritten each run), and skipped; `OUT/index.jsonl` lists each line's images. With
`--num-shards N` (or a Slurm array / JAX processes) shard I takes rows I, I + N, ... and writes
`errors-I-of-N.jsonl` / `index-I-of-N.jsonl`; the last shard to finish writes the merged `index.jsonl`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

from bgjax import __version__
from bgjax.fileio import (
    IMAGE_FORMATS,
    CheckpointError,
    atomic_write,
    check_image_format,
    save_image,
    write_json,
)
from bgjax.sampling.host import DEFAULT_PLACEMENT, Prepared
from bgjax.sampling.pipeline import BackgroundPipeline
from bgjax.sampling.schedulers import SAMPLERS
from bgjax.sampling.settings import GenerationSettings, file_digest, model_fingerprint
from bgjax.tables import COLUMNS, read_table

MANIFEST_FIELDS = COLUMNS
_PATH_FIELDS = ("product", "mask", "reference", "reference_mask")
THUMB = 128  # contact-sheet cell size in pixels
LABEL_HEIGHT = 18


@dataclasses.dataclass(frozen=True)
class Item:
    """One product to generate for; `fields` holds the inputs as written (paths relative to `base`)."""

    line: int | None  # in the manifest; None on the command line
    fields: dict
    base: Path
    seed: int
    num_images: int

    def path(self, key: str) -> Path | None:
        return None if self.fields.get(key) is None else self.base / self.fields[key]

    def stem(self, settings: GenerationSettings) -> str:
        """The file stem of this item's outputs under `settings`: the product's name and a digest of the
        inputs (as written, and the files' bytes) and of every setting."""
        digests = {k: file_digest(p) if (p := self.path(k)) is not None and p.is_file() else None
                   for k in _PATH_FIELDS}
        key = json.dumps([[self.fields.get(k) for k in (*_PATH_FIELDS, "category")], digests, settings.key()])
        name = re.sub(r"[^\w.-]+", "-", Path(self.fields["product"]).stem)[:60] or "product"
        return f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"

    def outputs(self, out: Path, settings: GenerationSettings) -> list[tuple[Path, Path]]:
        stem, suffix = self.stem(settings), IMAGE_FORMATS[settings.image_format][1]
        return [(out / f"{stem}_{k}{suffix}", out / f"{stem}_{k}.json") for k in range(self.num_images)]


def _int(value, name: str, low: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if number < low:
        raise ValueError(f"{name}: must be >= {low}, got {number}")
    return number


def make_item(row: dict, line: int | None, base: Path, seed: int, num_images: int) -> Item:
    """An Item from a manifest row or the command line (column names as in `bgjax.tables`); raises ValueError
    for missing or bad fields. Empty values count as absent; `seed` and `num_images` default to the command
    line's."""
    fields = {k: str(row[k]).strip() for k in MANIFEST_FIELDS if row.get(k) is not None and str(row[k]).strip()}
    missing = [k for k in ("product", "category") if k not in fields]
    if missing:
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    seed = _int(fields.pop("seed", seed), "seed", 0)
    num_images = _int(fields.pop("num_images", num_images), "num_images", 1)
    return Item(line, fields, base, seed, num_images)


def read_manifest(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, row, None) per CSV row / JSONL line, or (line number, row as written, reason) when
    unusable; raises TableError when the file is not a table (see `bgjax.tables`)."""
    for row in read_table(path, MANIFEST_FIELDS):
        yield (row.line, row.fields, None) if row.error is None else (row.line, {"raw": row.raw}, row.error)


def contact_sheet(rows: list[tuple[str, Image.Image, list[Image.Image]]], path: Path, title: str = "") -> None:
    """A PNG grid: per row the product, then its generated images, under a label; `title` (the settings)
    on a line above them all."""
    columns = 1 + max(len(images) for _, _, images in rows)
    top = LABEL_HEIGHT if title else 0
    sheet = Image.new("RGB", (columns * THUMB, top + len(rows) * (THUMB + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill="black")
    for r, (label, product, images) in enumerate(rows):
        y = top + r * (THUMB + LABEL_HEIGHT)
        draw.text((4, y + 3), label, fill="black")
        for c, image in enumerate([product, *images]):
            thumb = ImageOps.contain(image, (THUMB, THUMB))
            sheet.paste(thumb, (c * THUMB + (THUMB - thumb.width) // 2, y + LABEL_HEIGHT + (THUMB - thumb.height) // 2))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


class _Run:
    """One `bgjax generate` invocation: the pipeline, the settings and the counts."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.pipe = BackgroundPipeline.from_pretrained(args.model, jnp.bfloat16 if args.dtype == "bfloat16"
                                                       else jnp.float32)
        self.placement = tuple(args.placement) if args.placement else DEFAULT_PLACEMENT
        self.fingerprint = model_fingerprint(Path(args.model))
        self.sheet: list[tuple[str, Image.Image, list[Image.Image]]] = []
        self.items = self.images = self.skipped = 0

    def settings(self, item: Item) -> GenerationSettings:
        a = self.args
        return GenerationSettings(
            model=self.fingerprint, sampler=a.sampler, steps=a.steps, guidance=float(a.guidance),
            lambda_cg=a.lambda_cg, lambda_pg=a.lambda_pg, style_guidance=bool(a.style_guidance), size=a.size,
            width=a.width, height=a.height, placement=tuple(a.placement) if a.placement else None, dtype=a.dtype,
            prompt=a.prompt, negative_prompt=self.pipe.unconditional(a.negative_prompt), seed=item.seed,
            image_format=a.image_format, quality=a.quality, keep_product=bool(a.keep_product),
            edge_fill=bool(a.edge_fill))

    def prepare(self, item: Item) -> Prepared:
        paths = {k: item.path(k) for k in _PATH_FIELDS}
        return self.pipe.prepare(paths["product"], paths["mask"], item.fields["category"], paths["reference"],
                                 paths["reference_mask"], size=self.args.size, placement=self.placement,
                                 width=self.args.width, height=self.args.height)

    def process(self, item: Item) -> None:
        """Generate and write one item (or skip it when done); raises ValueError for bad input."""
        settings = self.settings(item)
        outputs = item.outputs(self.out, settings)
        done = all(png.is_file() and sidecar.is_file() for png, sidecar in outputs)
        if done and not self.args.contact_sheet:
            self.skipped += 1
            return
        prepared = self.prepare(item)
        if done:
            self.skipped += 1
            images = [Image.open(png) for png, _ in outputs]
        else:
            a = self.args
            notes = self.pipe.warnings(prepared, a.lambda_cg, a.lambda_pg, a.prompt)
            for note in notes:
                tqdm.write(f"bgjax generate: warning: {item.fields['product']}: {note}", file=sys.stderr)
            with warnings.catch_warnings():  # printed above and recorded in the sidecars
                warnings.simplefilter("ignore", UserWarning)
                images = self.pipe.generate(prepared, item.num_images, item.seed, a.steps, a.guidance, a.lambda_cg,
                                            a.lambda_pg, a.sampler, a.batch_size, a.style_guidance,
                                            prompt=a.prompt, negative_prompt=a.negative_prompt,
                                            keep_product=a.keep_product, edge_fill=a.edge_fill)
            self.write(item, prepared, images, outputs, settings, notes)
            self.items, self.images = self.items + 1, self.images + len(images)
        if self.args.contact_sheet:
            reference = item.fields.get("reference")
            label = (f"{prepared.category}  ({Path(item.fields['product']).name}, seed {item.seed}"
                     + (f", reference {Path(reference).name})" if reference else ")"))
            thumbs = [ImageOps.contain(im, (THUMB, THUMB)) for im in [Image.fromarray(prepared.product), *images]]
            self.sheet.append((label, thumbs[0], thumbs[1:]))

    def write(self, item: Item, prepared: Prepared, images: list[Image.Image], outputs: list[tuple[Path, Path]],
              settings: GenerationSettings, notes: list[str]) -> None:
        a = self.args
        lambda_cg, lambda_pg = self.pipe.lambdas(prepared, a.lambda_cg, a.lambda_pg)
        prompt = prepared.prompt.text if a.prompt is None else self.pipe.prompts.custom(a.prompt,
                                                                                        prepared.category).text
        info = {
            "prompt": prompt, "negative_prompt": settings.negative_prompt, "category": prepared.category,
            "seed": item.seed, "num_images": item.num_images, "model": str(Path(a.model).resolve()),
            "sampler": a.sampler, "steps": a.steps, "guidance": a.guidance, "style_guidance": a.style_guidance,
            "keep_product": a.keep_product, "edge_fill": a.edge_fill,
            "lambda_cg": lambda_cg, "lambda_pg": lambda_pg,
            "dtype": a.dtype, "size": list(images[0].size), "placement": prepared.placement,
            "format": a.image_format, "quality": a.quality if a.image_format != "png" else None,
            **{k: None if item.path(k) is None else str(item.path(k)) for k in _PATH_FIELDS},
            "warnings": notes, "settings": settings.to_dict(), "settings_key": settings.key(),
            "bgjax_version": __version__,
        }
        if item.line is not None:
            info.update(manifest=str(Path(a.manifest).resolve()), line=item.line)
        for k, (image, (file, sidecar)) in enumerate(zip(images, outputs, strict=True)):
            save_image(image, file, a.image_format, a.quality)
            write_json(sidecar, {**info, "image_index": k})  # written last: its presence marks the image done

    def summary(self, errors: int) -> str:
        text = (f"generated {self.images} images for {self.items} items in {self.out}; "
                f"{self.skipped} items already done (skipped); {errors} inputs with errors")
        return text + (f" (see {self.out / 'errors.jsonl'})" if errors and self.args.manifest else "")


def check_model(model: Path) -> None:
    """Fail fast, before anything loads, on a folder that is not a bgjax model (CheckpointError naming it)."""
    model = Path(model)
    if not model.is_dir():
        raise CheckpointError(f"--model {model}: no such folder")
    if not (model / "bgjax.json").is_file():
        raise CheckpointError(f"--model {model}: not a bgjax model (no bgjax.json); `bgjax convert` makes one from "
                              f"a diffusers folder or a .safetensors checkpoint, `bgjax train` writes one in "
                              f"WORKDIR/model")
    missing = [f"{k}/config.json" for k in ("unet", "vae", "text_encoder") if not (model / k / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"--model {model}: an incomplete bgjax model (missing {', '.join(missing)})")


def _missing_files(item: Item) -> str | None:
    """Why an item's files cannot be read, naming each missing path; None when every named file exists."""
    missing = [f"{k}: {item.path(k)}: file not found" for k in _PATH_FIELDS
               if item.path(k) is not None and not item.path(k).is_file()]
    return "; ".join(missing) or None


def _single_item(args: argparse.Namespace) -> Item:
    row = {"product": args.product, "mask": args.mask, "category": args.category, "reference": args.reference,
           "reference_mask": args.reference_mask}
    item = make_item(row, None, Path.cwd(), args.seed, args.num_images)
    reason = _missing_files(item)
    if reason:
        raise ValueError(reason)
    return item


def _manifest_items(args: argparse.Namespace, shard: int, shards: int) -> tuple[list[Item], list[dict]]:
    """The usable items of the manifest's shard `shard` of `shards` and its lines' errors; raises ValueError
    when it is not a table. Row r (broken ones included) belongs to shard r mod N: the shards cover the
    manifest once."""
    manifest = Path(args.manifest)
    if not manifest.is_file():
        raise ValueError(f"--manifest {manifest}: file not found")
    items, errors = [], []
    for line, row, reason in list(read_manifest(manifest))[shard::shards]:
        if reason is None:
            try:
                item = make_item(row, line, manifest.parent, args.seed, args.num_images)
                reason = _missing_files(item)
                if reason is None:
                    items.append(item)
                    continue
            except ValueError as e:
                reason = str(e)
        errors.append({"line": line, "input": row, "reason": reason})
    return items, errors


def _single(run: _Run, item: Item) -> int:
    try:
        with tqdm(total=item.num_images, unit="img", desc="generate") as bar:
            run.process(item)
            bar.update(item.num_images)
    except ValueError as e:
        print(f"bgjax generate: error: {e}", file=sys.stderr)
        return 2
    print(run.summary(0))
    return 0


def shard_of(args: argparse.Namespace) -> tuple[int, int]:
    """(shard index, shard count): --shard-index/--num-shards, else a Slurm job array's task, else the JAX
    process (a pod slice), else (0, 1)."""
    if args.num_shards is not None or args.shard_index is not None:
        index, count = args.shard_index or 0, args.num_shards or 1
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    else:
        index, count = jax.process_index(), jax.process_count()
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard {index} of {count}: expected 0 <= --shard-index < --num-shards")
    return index, count


def _jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"))


def _manifest(run: _Run, items: list[Item], errors: list[dict], shard: int, shards: int) -> int:
    manifest = Path(run.args.manifest)

    def report(error: dict) -> None:
        tqdm.write(f"{manifest.name}:{error['line']}: {error['reason']}", file=sys.stderr)

    for error in errors:
        report(error)
    index = []
    with tqdm(total=sum(i.num_images for i in items), unit="img", desc="generate") as bar:
        for item in items:
            try:
                run.process(item)
                index.append({"line": item.line, **item.fields, "seed": item.seed,
                              "images": [png.name for png, _ in item.outputs(run.out, run.settings(item))]})
            except ValueError as e:
                errors.append({"line": item.line, "input": item.fields, "reason": str(e)})
                report(errors[-1])
            bar.update(item.num_images)
    errors.sort(key=lambda e: e["line"])
    suffix = "" if shards == 1 else f"-{shard:05d}-of-{shards:05d}"
    _jsonl(run.out / f"errors{suffix}.jsonl", errors)
    _jsonl(run.out / f"index{suffix}.jsonl", index)
    if shards > 1:
        _merge_index(run.out, shards)
    print(run.summary(len(errors)) + (f" [shard {shard} of {shards}]" if shards > 1 else ""))
    return 1 if errors else 0


def _merge_index(out: Path, shards: int) -> None:
    """OUT/index.jsonl of every shard's outputs, once all N shard indexes exist (whichever shard ends last)."""
    parts = [out / f"index-{i:05d}-of-{shards:05d}.jsonl" for i in range(shards)]
    if all(p.is_file() for p in parts):
        rows = [json.loads(line) for p in parts for line in p.read_text(encoding="utf-8").splitlines()]
        _jsonl(out / "index.jsonl", sorted(rows, key=lambda r: r["line"]))


def generate_command(args: argparse.Namespace) -> int:
    """Exit status: 0 all written, 1 some manifest lines failed, 2 bad input for a single product.
    Inputs and the model folder are checked before the model loads; a failed single product writes nothing."""
    if args.sampler not in SAMPLERS:
        print(f"bgjax generate: error: --sampler {args.sampler!r} is not one of {', '.join(SAMPLERS)}",
              file=sys.stderr)
        return 2
    try:
        check_image_format(args.image_format, args.quality)
        if args.size is not None and (args.width is not None or args.height is not None):
            raise ValueError("--size: give either --size (the longer side) or --width / --height, not both")
    except ValueError as e:
        print(f"bgjax generate: error: {e}", file=sys.stderr)
        return 2
    if args.product and not args.category:
        print("bgjax generate: error: --category is required with --product", file=sys.stderr)
        return 2
    if args.manifest and any(getattr(args, k) for k in ("mask", "category", "reference", "reference_mask")):
        print("bgjax generate: error: with --manifest, masks, categories and references come from the manifest",
              file=sys.stderr)
        return 2
    try:
        check_model(args.model)
        if args.manifest:
            shard, shards = shard_of(args)
            items, errors = _manifest_items(args, shard, shards)
        else:
            item = _single_item(args)
    except ValueError as e:
        print(f"bgjax generate: error: {e}", file=sys.stderr)
        return 2
    run = _Run(args)  # the output folder appears with its first file (atomic_write makes it)
    status = _manifest(run, items, errors, shard, shards) if args.manifest else _single(run, item)
    if args.contact_sheet and run.sheet:
        contact_sheet(run.sheet, run.out / "contact_sheet.png", f"{Path(args.model).name}: {args.sampler}, "
                      f"{args.steps} steps, guidance {args.guidance}" + (", style guidance" if args.style_guidance
                                                                           else ""))
        print(f"contact sheet: {run.out / 'contact_sheet.png'}")
    elif run.images and (run.out / "contact_sheet.png").is_file():  # an earlier run's: it shows other images
        (run.out / "contact_sheet.png").unlink()
        print(f"removed {run.out / 'contact_sheet.png'}: an earlier run's, of other images (--contact-sheet writes "
              f"this run's)")
    return status
