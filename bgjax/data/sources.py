"""Input listings: the BG60k layout, a shop's own folder, and the synthetic generator.

A listing resolves every line to files (or rejects it with a reason) before anything is
decoded; decoding and the remaining checks happen in the shard writers.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from bgjax.tables import read_table

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
INFO_FILES = {"bg60k": "bg60k_info.txt", "bg1k": "bg1k_info.txt", "bgpair": "bgpair_info.txt"}


@dataclasses.dataclass(frozen=True)
class InputItem:
    id: str
    category: str
    image: Path | None = None
    mask: Path | None = None  # None: the image's own alpha is the mask
    ref_id: str | None = None
    ref_image: Path | None = None
    ref_mask: Path | None = None
    source: str = ""
    synthetic: tuple[int, int, int] | None = None  # (index, seed, size) for generated samples


@dataclasses.dataclass
class Listing:
    items: list[InputItem]
    rejected: list[dict]  # {"input": ..., "reason": ...}

    @property
    def num_inputs(self) -> int:
        return len(self.items) + len(self.rejected)


def _index(root: Path, pattern: str) -> dict[str, list[Path]]:
    """Files under folders matching `pattern`, by lower-cased name and by lower-cased stem."""
    by_key: dict[str, list[Path]] = defaultdict(list)
    for folder in sorted(root.glob(pattern)):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                by_key[f.name.lower()].append(f)
                by_key["stem:" + f.stem.lower()].append(f)
    return by_key


def _safe_name(name: str) -> str | None:
    """The reason a listed name is unusable, or None."""
    if not name:
        return "empty image name"
    if "/" in name or "\\" in name or name in (".", "..") or ":" in name:
        return f"image name {name!r} is a path (names must not leave the dataset's folders)"
    return None


def _resolve(index: dict[str, list[Path]], name: str, what: str) -> Path:
    """Exact file name first, then the stem with any image extension."""
    hits = index.get(name.lower()) or index.get("stem:" + Path(name).stem.lower()) or []
    if not hits:
        raise LookupError(f"{what} {name!r} not found")
    if len(hits) > 1:
        raise LookupError(f"{what} {name!r} is ambiguous: {', '.join(str(h) for h in hits[:3])}")
    return hits[0]


def _split_line(line: str, fields: int) -> list[str]:
    """Tab-separated if there is a tab, else the first fields-1 whitespace tokens and the rest."""
    parts = [p.strip() for p in line.split("\t")] if "\t" in line else line.split(None, fields - 1)
    return [p.strip() for p in parts]


def list_bg60k(root: Path, split: str = "bg60k") -> Listing:
    """BG60k: `{split}_info.txt` (name, category) or `bgpair_info.txt` (name, reference, category);
    images in `*_imgs_{i}/`, RGBA cut-out masks in `*_masks_{i}/`."""
    root = Path(root)
    if split not in INFO_FILES:
        raise ValueError(f"split must be one of {', '.join(INFO_FILES)}, got {split!r}")
    info = root / INFO_FILES[split]
    if not info.is_file():
        raise FileNotFoundError(f"{info}: not found (is {root} a BG60k folder?)")
    images, masks = _index(root, "*_imgs_*"), _index(root, "*_masks_*")
    fields = 3 if split == "bgpair" else 2
    items, rejected, seen = [], [], set()
    for number, raw in enumerate(info.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{info.name}:{number}: {line}"
        parts = _split_line(line, fields)
        if len(parts) != fields or not parts[-1]:
            rejected.append({"input": where, "reason": f"expected {fields} fields (name[, reference], category)"})
            continue
        names, category = parts[:-1], " ".join(parts[-1].split())
        reason = next((r for r in map(_safe_name, names) if r), None)
        if reason:
            rejected.append({"input": where, "reason": reason})
            continue
        # A target may pair with several references: a pair's id names both.
        item_id = "__".join(Path(n).stem for n in names)
        if item_id.lower() in seen:
            rejected.append({"input": where, "reason": f"duplicate {'pair' if split == 'bgpair' else 'image'} "
                                                       f"{' / '.join(names)!r}"})
            continue
        try:
            image = _resolve(images, names[0], "image")
            mask = _resolve(masks, Path(names[0]).stem, "mask")
            ref = {}
            if split == "bgpair":
                ref = {"ref_id": Path(names[1]).stem, "ref_image": _resolve(images, names[1], "reference image"),
                       "ref_mask": _resolve(masks, Path(names[1]).stem, "reference mask")}
        except LookupError as e:
            rejected.append({"input": where, "reason": str(e)})
            continue
        seen.add(item_id.lower())
        items.append(InputItem(item_id, category, image, mask, source=f"bg60k/{split}", **ref))
    return Listing(items, rejected)


FOLDER_COLUMNS = ("product", "mask", "category")


def list_folder(images: Path, categories: Path, masks: Path | None = None) -> Listing:
    """A shop's catalogue: images (optionally RGBA cut-outs), masks, and a CSV or JSONL table (`bgjax.tables`)
    with `product` (or `image`) and `category`, `mask` optional. An image without a mask file (none named,
    none found under `masks`) uses its alpha channel as the mask; one with neither is rejected when decoded."""
    images, categories = Path(images), Path(categories)
    image_index = _index(images.parent, images.name)
    mask_index = _index(masks.parent, masks.name) if masks else {}
    items, rejected, seen = [], [], set()
    for row in read_table(categories, FOLDER_COLUMNS):
        where = f"{categories.name}:{row.line}: {row.raw}"
        name, mask_name = row.fields.get("product", ""), row.fields.get("mask")
        category = " ".join(row.fields.get("category", "").split())
        reason = row.error or _safe_name(name) or (None if category else "no category")
        if not reason and mask_name and not masks:
            reason = f"mask {mask_name!r} named but no mask folder given (--masks)"
        if not reason and Path(name).stem.lower() in seen:
            reason = f"duplicate image {name!r}"
        if reason:
            rejected.append({"input": where, "reason": reason})
            continue
        try:
            image = _resolve(image_index, name, "image")
            mask = _resolve(mask_index, mask_name, "mask") if mask_name else _find(mask_index, Path(name).stem)
        except LookupError as e:
            rejected.append({"input": where, "reason": str(e)})
            continue
        seen.add(Path(name).stem.lower())
        items.append(InputItem(Path(name).stem, category, image, mask, source="folder"))
    return Listing(items, rejected)


def _find(index: dict[str, list[Path]], stem: str) -> Path | None:
    """The mask file named after the image, or None (then the image's alpha is its mask)."""
    try:
        return _resolve(index, stem, "mask")
    except LookupError:
        if index.get("stem:" + stem.lower()):
            raise  # ambiguous: several files could be the mask
        return None


def list_synthetic(num: int, seed: int = 0, size: int = 128) -> Listing:
    from bgjax.data.synthetic import CATEGORIES

    return Listing([InputItem(f"synthetic-{seed}-{i:07d}", CATEGORIES[i % len(CATEGORIES)], source="synthetic",
                              synthetic=(i, seed, size)) for i in range(num)], [])
