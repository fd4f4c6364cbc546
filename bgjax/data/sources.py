"""Input listings: a shop's own folder and the synthetic generator (the BG60k release: `bgjax.data.bg60k`).

A listing resolves every line to files (or rejects it with a reason) before anything is
decoded; decoding and the remaining checks happen in the shard writers.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from bgjax.tables import read_table

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


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
    mask_threshold: int = 127  # product where the mask (or alpha) value is above this


@dataclasses.dataclass
class Listing:
    items: list[InputItem]
    rejected: list[dict]  # {"input": ..., "reason": ...}: lines that did not become items
    unmatched: list[dict] = dataclasses.field(default_factory=list)  # {"file": ..., "reason": ...}: files no line used

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


def safe_name(name: str) -> str | None:
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
        reason = row.error or safe_name(name) or (None if category else "no category")
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
