"""`bgjax eval`: generate for a BG1K- or BG-pair-style split with each method variant, then background
CLIP similarity, FID, the paper-style table, a t-SNE figure and contact sheets.

Data: the record folder written by `bgjax data bg60k --split bg1k|bgpair` (or any `bgjax data` folder
for bg1k). `--num N` takes the first N records in shard order. Each record is an ad image, its product
mask and its category. A BG-pair record also names its reference: `bgjax data` embeds the reference's
image and mask in the record (`ref_image`, `ref_mask`, `ref_id`), and those are used; a record without
them has its reference looked up by `ref_id` among all records of the same folder (a record whose `id`
is `ref_id`, else one whose id's target part, before `__`, is `ref_id`). A pair whose reference cannot be
found is reported in errors.jsonl and left out.

Variants (rows of the table), one BackgroundPipeline each, sharing the model's params:

    sd          the frozen UNet alone: text-to-image from the same prompt with no branches and no learned
                identifiers (the placeholder stays an ordinary token), the product pasted back
    controlnet  the model's converted ControlNet (controlnet/) on I * M in [0, 1] when it has one, else the CG
                branch's weights with plain cross-attention instead of mask-guided (the UNet's too); the
                sidecars' `cg_source` says which ran
    cg          CG with mask-guided cross-attention, no reference
    cg_pg       CG + PG with the reference: BG-pair's reference; on BG1K skipped unless --self-reference,
                which uses each image's own background (PG's self-supervised training setup; PG then
                sees the target's background, so its CLIP-sim is optimistic)
    real        the split's own images as if generated: a check row (BG1K: CLIP-sim 1, FID 0) and, on
                BG-pair, the similarity of the true pairs

A variant whose branches the model lacks is reported as skipped, with the reason.

Metrics: CLIP-sim = cosine similarity of CLIP embeddings with the products masked out
(`bgjax.eval.clip_similarity`), each generated image (masked by its record's product mask) against the
record's ad image (bg1k) or its reference (bgpair, masked by the reference's mask); FID against the
evaluated records' real ad images (one per record), clean-fid resize (`bgjax.eval.fid`; while neither set
is larger than the 2048 feature dims, `frechet_distance_of_features`: exact for singular covariances). The
metric networks see each image once, batched and sharded (`bgjax.eval.features`).

Outputs in OUT: images/VARIANT/ID_HASH_K.png + .json sidecars (the cache: the hash covers the record's
bytes, the variant and `GenerationSettings.key()`: the model's file contents, the seed and every setting;
so a rerun skips finished images and a changed setting writes new ones), metrics.json, table.md,
per_image.jsonl, tsne.png + tsne.json, contact_sheet_VARIANT.png, errors.jsonl. Metrics are recomputed on
every run; the model is loaded only when something is left to generate. Each record's noise seed comes
from (--seed, its id): the same in every variant, different across records.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from bgjax import __version__, model_dir
from bgjax.data.convert import read_manifest
from bgjax.data.example import decode_example
from bgjax.data.images import decode_mask, decode_rgb
from bgjax.data.records import read_records
from bgjax.eval.features import FeatureExtractor
from bgjax.eval.fid import ActivationStatistics, frechet_distance, frechet_distance_of_features
from bgjax.eval.report import markdown_table, tsne_figure
from bgjax.fileio import atomic_write, write_json
from bgjax.sampling.generate import THUMB, contact_sheet
from bgjax.sampling.pipeline import BackgroundPipeline
from bgjax.sampling.schedulers import SAMPLERS
from bgjax.sampling.settings import GenerationSettings, model_fingerprint

VARIANTS = {
    "sd": "SD",
    "controlnet": "ControlNet",
    "cg": "CG (ours)",
    "cg_pg": "CG + PG (ours)",
    "real": "Real images",
}
DEFAULT_VARIANTS = ("sd", "controlnet", "cg", "cg_pg")
SPLITS = ("bg1k", "bgpair")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One record to evaluate: encoded image and mask (and the reference's, for BG-pair)."""

    id: str
    category: str
    image: bytes
    mask: bytes
    ref_id: str | None = None
    reference: bytes | None = None
    reference_mask: bytes | None = None

    @functools.cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.image, self.mask, self.reference or b"", self.reference_mask or b""):
            h.update(hashlib.sha256(part).digest())
        return h.hexdigest()[:16]

    def rgb(self) -> np.ndarray:
        return decode_rgb(self.image)

    def mask_array(self) -> np.ndarray:
        """(H, W) float32 in {0, 1}, 1 = product."""
        return (decode_mask(self.mask) >= 128).astype(np.float32)

    def reference_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return decode_rgb(self.reference), (decode_mask(self.reference_mask) >= 128).astype(np.float32)


def _text(example: dict, key: str) -> str | None:
    values = example.get(key)
    return values[0].decode("utf-8") if values else None


def read_split(data_dir: Path, split: str, num: int | None = None) -> tuple[list[EvalItem], list[dict]]:
    """(the first `num` records as EvalItems, problems {"id", "reason"}); see the module doc for references."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    records = []
    for shard in manifest["shards"]:
        for raw in read_records(data_dir / shard["path"]):
            ex = decode_example(raw)
            records.append(EvalItem(_text(ex, "id"), " ".join(_text(ex, "category").split()), ex["image"][0],
                                    ex["mask"][0], _text(ex, "ref_id"), (ex.get("ref_image") or [None])[0],
                                    (ex.get("ref_mask") or [None])[0]))
    selected = records if num is None else records[:num]
    if split != "bgpair":
        return selected, []
    by_id = {r.id: r for r in records}
    by_target: dict[str, EvalItem] = {}
    for r in records:
        by_target.setdefault(r.id.split("__")[0], r)
    items, problems = [], []
    for r in selected:
        if r.reference is not None and r.reference_mask is not None:
            items.append(r)
            continue
        found = (by_id.get(r.ref_id) or by_target.get(r.ref_id)) if r.ref_id else None
        if found is None:
            why = "no ref_id" if not r.ref_id else \
                f"its reference {r.ref_id!r} is not embedded and no record has that id"
            problems.append({"id": r.id, "reason": f"not a BG-pair record: {why}"})
            continue
        items.append(dataclasses.replace(r, reference=found.image, reference_mask=found.mask))
    return items, problems


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name)[:60] or "item"


def _item_seed(seed: int, item_id: str) -> int:
    """Each record's own noise seed, the same in every variant (paired comparisons)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{item_id}".encode()).digest()[:4], "little")


def variant_pipeline(base: BackgroundPipeline, variant: str) -> BackgroundPipeline:
    """The pipeline of a generating variant (sd, controlnet, cg, cg_pg), sharing `base`'s params."""
    if variant == "sd":
        return base.variant(cg=False, pg=False, identifiers=False)
    if variant == "controlnet":  # the model's own ControlNet when it has one, else CG's weights without the mask
        if base.controlnet is not None:
            return base.variant(pg=False, unet_region_mode="none", controlnet=True)
        return base.variant(pg=False, cg_region_mode="none", unet_region_mode="none")
    if variant == "cg":
        return base.variant(pg=False)
    if variant == "cg_pg":
        return base.variant()
    raise ValueError(f"variant {variant!r} does not generate")


class _Run:
    """One `bgjax eval` invocation."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.split = args.split
        self.errors: list[dict] = []
        self.counts: dict[str, dict[str, int]] = {}
        self._base: BackgroundPipeline | None = None
        self._fingerprint = model_fingerprint(Path(args.model))

    @property
    def base(self) -> BackgroundPipeline:
        if self._base is None:
            dtype = jnp.bfloat16 if self.args.dtype == "bfloat16" else jnp.float32
            self._base = BackgroundPipeline.from_pretrained(self.args.model, dtype)
        return self._base

    # --- variants -------------------------------------------------------------------------------

    def skip_reason(self, variant: str) -> str | None:
        """Why the variant cannot run, or None (read from the model's manifest: nothing is loaded)."""
        if variant in ("sd", "real"):
            return None
        present = model_dir.components(Path(self.args.model))
        if variant == "controlnet" and "controlnet" in present:
            return None
        if "cg" not in present:
            return f"the model has no CG branch ({Path(self.args.model) / 'cg'} missing)"
        if variant in ("controlnet", "cg"):
            return None
        if "pg" not in present:
            return f"the model has no PG branch ({Path(self.args.model) / 'pg'} missing)"
        if self.split == "bg1k" and not self.args.self_reference:
            return ("BG1K has no reference images (--self-reference uses each image's own background; "
                    "BG-pair is the split for CG + PG)")
        return None

    def pipeline(self, variant: str) -> BackgroundPipeline:
        """The variant's pipeline (the model is loaded on first use: a rerun with every image cached loads none)."""
        return variant_pipeline(self.base, variant)

    def reference(self, variant: str, item: EvalItem) -> tuple[bytes | None, bytes | None]:
        if variant != "cg_pg":
            return None, None
        return (item.image, item.mask) if self.split == "bg1k" else (item.reference, item.reference_mask)

    def settings(self, variant: str) -> dict:
        a = self.args
        return {"variant": variant, "steps": a.steps, "guidance": a.guidance, "sampler": a.sampler,
                "lambda_cg": a.lambda_cg, "lambda_pg": a.lambda_pg, "size": a.size, "dtype": a.dtype,
                "self_reference": bool(a.self_reference) and variant == "cg_pg"}

    def generation_settings(self, item: EvalItem) -> GenerationSettings:
        a = self.args
        return GenerationSettings(model=self._fingerprint, sampler=a.sampler, steps=a.steps, guidance=float(a.guidance),
                                  lambda_cg=a.lambda_cg, lambda_pg=a.lambda_pg, style_guidance=False, size=a.size,
                                  width=None, height=None, placement=None, dtype=a.dtype, prompt=None,
                                  negative_prompt="", seed=_item_seed(a.seed, item.id))

    def outputs(self, variant: str, item: EvalItem) -> list[tuple[Path, Path]]:
        # The variant and its reference choice are eval's own; the rest is what any generation is keyed on.
        key = json.dumps([item.id, item.digest, variant, self.settings(variant)["self_reference"],
                          self.generation_settings(item).key()])
        stem = f"{_safe(item.id)}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        folder = self.out / "images" / variant
        return [(folder / f"{stem}_{k}.png", folder / f"{stem}_{k}.json") for k in range(self.args.images_per_item)]

    # --- generation -----------------------------------------------------------------------------

    def generate(self, variant: str, items: list[EvalItem]) -> None:
        a, counts = self.args, {"items_generated": 0, "items_cached": 0, "items_failed": 0}
        self.counts[variant] = counts
        todo = []
        for item in items:
            if all(png.is_file() and sidecar.is_file() for png, sidecar in self.outputs(variant, item)):
                counts["items_cached"] += 1
            else:
                todo.append(item)
        per_item, warned = a.images_per_item, set()
        pipe = self.pipeline(variant) if todo else None
        with tqdm(total=len(items) * per_item, initial=counts["items_cached"] * per_item, unit="img",
                  desc=f"generate {variant}") as bar:
            for item in todo:
                reference, reference_mask = self.reference(variant, item)
                try:
                    prepared = pipe.prepare(item.image, item.mask, item.category, reference, reference_mask,
                                            size=a.size)
                    notes = pipe.warnings(prepared, a.lambda_cg, a.lambda_pg)
                    with warnings.catch_warnings():  # printed once per variant below, recorded in the sidecars
                        warnings.simplefilter("ignore", UserWarning)
                        images = pipe.generate(prepared, per_item, _item_seed(a.seed, item.id), a.steps, a.guidance,
                                               a.lambda_cg, a.lambda_pg, a.sampler, a.batch_size,
                                               negative_prompt="")  # as recorded (SDXL: encoded, not zeros)
                except ValueError as e:
                    counts["items_failed"] += 1
                    self.errors.append({"variant": variant, "id": item.id, "reason": str(e)})
                    tqdm.write(f"{variant} {item.id}: {e}", file=sys.stderr)
                    bar.update(per_item)
                    continue
                lambda_cg, lambda_pg = pipe.lambdas(prepared, a.lambda_cg, a.lambda_pg)
                info = {"variant": variant, "id": item.id, "category": prepared.category,
                        "prompt": prepared.prompt.text, "seed": a.seed, "item_seed": _item_seed(a.seed, item.id),
                        "reference_id": item.id if reference is not None and self.split == "bg1k"
                        else (item.ref_id if reference is not None else None),
                        "model": str(Path(a.model).resolve()), "data": str(Path(a.data).resolve()),
                        "split": self.split, **self.settings(variant), "lambda_cg": lambda_cg,
                        "lambda_pg": lambda_pg, "settings_key": self.generation_settings(item).key(),
                        "cg_source": pipe.cg_source if pipe.has_cg else None, "warnings": notes,
                        "bgjax_version": __version__}
                for note in notes:
                    if note not in warned:
                        warned.add(note)
                        tqdm.write(f"bgjax eval: warning: {variant}: {note}", file=sys.stderr)
                for k, (image, (png, sidecar)) in enumerate(zip(images, self.outputs(variant, item), strict=True)):
                    atomic_write(png, lambda tmp, image=image: image.save(tmp, format="PNG"))
                    write_json(sidecar, {**info, "image_index": k})  # last: its presence marks the image done
                counts["items_generated"] += 1
                bar.update(per_item)

    # --- metrics --------------------------------------------------------------------------------

    def entries(self, variant: str, items: list[EvalItem]) -> list[tuple[int, int, Path | None]]:
        """(item index, image index, PNG or None for the record's own image) of the variant's images."""
        if variant == "real":
            return [(i, 0, None) for i in range(len(items))]
        return [(i, k, png) for i, item in enumerate(items)
                for k, (png, sidecar) in enumerate(self.outputs(variant, item)) if png.is_file() and sidecar.is_file()]

    @staticmethod
    def pairs(items: list[EvalItem], entries: list[tuple[int, int, Path | None]]) -> Iterator[tuple]:
        masks: dict[int, np.ndarray] = {}
        for i, _, png in entries:
            if i not in masks:
                masks = {i: items[i].mask_array()}  # entries come item by item: keep one
            image = items[i].rgb() if png is None else np.asarray(Image.open(png).convert("RGB"))
            yield image, masks[i]


def _fid(features: np.ndarray | None, real: np.ndarray | None) -> tuple[float | None, str | None]:
    """(FID, None) or (None, why not)."""
    if features is None or real is None:
        return None, "not computed: no --inception weights given"
    if len(features) < 2 or len(real) < 2:
        return None, (f"not computed: needs at least 2 images on each side ({len(features)} generated, "
                      f"{len(real)} real)")
    if max(len(features), len(real)) <= features.shape[1]:  # an SVD of N1 x N2 beats two D x D eigh
        return frechet_distance_of_features(features, real), None
    stats = [ActivationStatistics(features.shape[1]) for _ in range(2)]
    stats[0].update(features)
    stats[1].update(real)
    return frechet_distance(stats[0].mean, stats[0].covariance(), stats[1].mean, stats[1].covariance()), None


def _sheet(run: _Run, variant: str, items: list[EvalItem], rows: int) -> Path | None:
    lines = []
    with_reference = run.split == "bgpair" or variant == "cg_pg"
    for item in items[:rows]:
        pngs = [png for png, sidecar in run.outputs(variant, item) if png.is_file() and sidecar.is_file()]
        if not pngs:
            continue
        thumbs = [ImageOps.contain(Image.open(p).convert("RGB"), (THUMB, THUMB)) for p in pngs]
        if with_reference:
            reference = item.reference if run.split == "bgpair" else item.image
            thumbs.insert(0, ImageOps.contain(Image.fromarray(decode_rgb(reference)), (THUMB, THUMB)))
        columns = "real, reference, generated" if with_reference else "real, generated"
        lines.append((f"{item.category} ({item.id}): {columns}",
                      ImageOps.contain(Image.fromarray(item.rgb()), (THUMB, THUMB)), thumbs))
    if not lines:
        return None
    path = run.out / f"contact_sheet_{variant}.png"
    contact_sheet(lines, path)
    return path


def _check_args(a: argparse.Namespace) -> str | None:
    if a.split not in SPLITS:
        return f"--split {a.split!r} is not one of {', '.join(SPLITS)}"
    if a.sampler not in SAMPLERS:
        return f"--sampler {a.sampler!r} is not one of {', '.join(SAMPLERS)}"
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown or not a.variants:
        return f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}"
    for name in ("num", "images_per_item", "steps", "feature_batch_size", "sheet_rows"):
        value = getattr(a, name)
        if value is not None and value < (0 if name == "sheet_rows" else 1):
            return f"--{name.replace('_', '-')} must be positive, got {value}"
    for name in ("clip", "inception"):
        folder = getattr(a, name)
        if folder and not (Path(folder) / "config.json").is_file():
            return f"--{name} {folder}: no config.json (write it with `bgjax metric-weights {name} ...`)"
    return None


def eval_command(args: argparse.Namespace) -> int:
    """Exit status 0; 1 when some records could not be generated (see OUT/errors.jsonl); 2 for bad arguments."""
    from bgjax.eval.weights import load_clip_vision, load_inception

    args.variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip())) \
        if isinstance(args.variants, str) else list(args.variants)
    problem = _check_args(args)
    if problem:
        print(f"bgjax eval: error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(args)
    items, problems = read_split(Path(args.data), args.split, args.num)
    run.errors += [{"variant": None, **p} for p in problems]
    for p in problems[:10]:
        print(f"bgjax eval: {p['id']}: {p['reason']}", file=sys.stderr)
    if len(problems) > 10:
        print(f"bgjax eval: ... and {len(problems) - 10} more records left out (see errors.jsonl)", file=sys.stderr)
    if not items:
        print(f"bgjax eval: error: {args.data}: no usable {args.split} records", file=sys.stderr)
        return 2

    # Generation first, variant by variant (each variant's sampling program compiles once).
    skipped = {}
    for variant in args.variants:
        reason = run.skip_reason(variant)
        if reason:
            skipped[variant] = reason
            print(f"{variant}: skipped ({reason})")
        elif variant != "real":
            run.generate(variant, items)

    # Metric networks after generation: the sampling programs and the networks need not share memory.
    extractor = FeatureExtractor(load_clip_vision(args.clip) if args.clip else None,
                                 load_inception(args.inception) if args.inception else None,
                                 args.feature_batch_size)
    entries_real = [(i, 0, None) for i in range(len(items))]
    real = extractor(run.pairs(items, entries_real), total=len(items), desc="features real")
    targets = real.get("clip")
    if args.split == "bgpair" and targets is not None:
        refs = ((item.reference_arrays()) for item in items)
        targets = extractor(refs, inception=False, total=len(items), desc="features references")["clip"]

    variants, per_image, panels = {}, [], []
    if "clip" in real:
        panels.append(("real images", real["clip"], [item.category for item in items]))
    for variant in args.variants:
        row = {"label": VARIANTS[variant], "clip_similarity": None, "fid": None, "num_images": 0,
               "num_items": 0, **run.counts.get(variant, {})}
        variants[variant] = row
        if variant in skipped:
            row["skipped"] = skipped[variant]
            continue
        if variant == "cg_pg" and args.split == "bg1k":
            row["note"] = "reference = the image's own background (--self-reference): CLIP-sim is optimistic"
        entries = run.entries(variant, items)
        row["num_images"], row["num_items"] = len(entries), len({i for i, _, _ in entries})
        if not entries:
            row["clip_similarity_note"] = row["fid_note"] = "not computed: no images"
            continue
        feats = extractor(run.pairs(items, entries), total=len(entries), desc=f"features {variant}")
        if targets is None:
            row["clip_similarity_note"] = "not computed: no --clip weights given"
        else:
            index = np.asarray([i for i, _, _ in entries])
            sims = np.sum(feats["clip"] * targets[index], axis=-1)
            row["clip_similarity"], row["clip_similarity_std"] = float(sims.mean()), float(sims.std())
            per_image += [{"variant": variant, "id": items[i].id, "category": items[i].category, "image_index": k,
                           "path": None if png is None else str(png.relative_to(out)), "clip_similarity": float(s)}
                          for (i, k, png), s in zip(entries, sims, strict=True)]
            if variant != "real":
                panels.append((row["label"], feats["clip"], [items[i].category for i, _, _ in entries]))
        row["fid"], note = _fid(feats.get("inception"), real.get("inception"))
        if note:
            row["fid_note"] = note

    a = args
    metrics = {
        "split": a.split, "data": str(Path(a.data).resolve()), "model": str(Path(a.model).resolve()),
        "clip": a.clip and str(Path(a.clip).resolve()), "inception": a.inception and str(Path(a.inception).resolve()),
        "num_items": len(items), "num_records_skipped": len(problems),
        "settings": {"images_per_item": a.images_per_item, "steps": a.steps, "seed": a.seed, "guidance": a.guidance,
                     "sampler": a.sampler, "lambda_cg": a.lambda_cg, "lambda_pg": a.lambda_pg, "size": a.size,
                     "dtype": a.dtype, "self_reference": bool(a.self_reference)},
        "clip_similarity_against": "original image" if a.split == "bg1k" else "reference image",
        "fid_reference": {"num_images": len(items),
                          "images": "the evaluated records' real ad images, one per record"},
        "variant_order": list(variants),
        "variants": variants,
        "bgjax_version": __version__,
    }
    outputs = ["metrics.json", "table.md", "per_image.jsonl", "errors.jsonl"]
    if panels:  # no panels without --clip
        write_json(out / "tsne.json", tsne_figure(panels, out / "tsne.png", seed=a.seed))
        outputs += ["tsne.png", "tsne.json"]
    for variant in args.variants:
        if variant not in skipped and variant != "real" and _sheet(run, variant, items, a.sheet_rows):
            outputs.append(f"contact_sheet_{variant}.png")
    write_json(out / "metrics.json", metrics)
    table = markdown_table(metrics)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    atomic_write(out / "per_image.jsonl", lambda tmp: Path(tmp).write_text(jsonl(per_image), encoding="utf-8"))
    atomic_write(out / "errors.jsonl", lambda tmp: Path(tmp).write_text(jsonl(run.errors), encoding="utf-8"))

    print(table)
    for variant, c in run.counts.items():
        print(f"{variant}: generated {c['items_generated']} items, {c['items_cached']} already done (skipped), "
              f"{c['items_failed']} failed")
    print(f"wrote {', '.join(outputs)} to {out}")
    generation_errors = [e for e in run.errors if e["variant"] is not None]
    return 1 if generation_errors else 0
