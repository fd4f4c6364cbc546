"""The BG60k release as it is distributed, read without guessing.

The release (and the public code of people who downloaded it) lays it out as

    bg60k_info.txt  bg1k_info.txt  bgpair_info.txt    a line per input: image [reference] category
    bg60k_imgs_0/ ... bg60k_imgs_4/    161.png        images (PNG)
    bg60k_masks_0/ ... bg60k_masks_4/  161_mask.png   RGBA cut-outs; alpha > 128 is the product
    bg1k_imgs/  bg1k_masks/            0.png, 0_mask.png

Folders are found with or without the index suffix (and inside the nested folder that unzipping often
adds); a mask is the image's stem plus `_mask` (or `-mask`, ` mask`, `.mask`, or the stem alone), any
image extension. An image with several candidate masks, a listed name found in several folders, or a
missing file rejects that line with the candidates named; masks without an image and images the list
does not name are reported as unmatched files. Nothing is matched by position or by guess.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

from bgjax.data.sources import IMAGE_SUFFIXES, InputItem, Listing, safe_name

LIST_FILES = {"bg60k": "bg60k_info.txt", "bg1k": "bg1k_info.txt", "bgpair": "bgpair_info.txt"}
# The release's users read a mask's alpha as product where it is above 128.
ALPHA_THRESHOLD = 128
MASK_SUFFIXES = ("_mask", "-mask", " mask", ".mask", "")
MIN_MATCH = 0.5  # `bgjax data bg60k` stops, writing nothing, when fewer lines than this share match
_FOLDER = re.compile(r"(bg60k|bg1k|bgpair)_(imgs|images|masks|mask)(_\d+)?", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Files:
    """The image files under some folders, by lower-cased name and by lower-cased stem."""

    folders: tuple[Path, ...]
    by_name: dict[str, list[Path]]
    by_stem: dict[str, list[Path]]

    @classmethod
    def index(cls, folders: list[Path]) -> Files:
        by_name, by_stem = defaultdict(list), defaultdict(list)
        for folder in folders:
            for f in sorted(folder.rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith("."):
                    by_name[f.name.lower()].append(f)
                    by_stem[f.stem.lower()].append(f)
        return cls(tuple(folders), dict(by_name), dict(by_stem))

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_name.values())

    def image(self, name: str, what: str) -> Path:
        """A listed name: the exact file name first, else its stem with any image extension."""
        hits = self.by_name.get(name.lower()) or self.by_stem.get(Path(name).stem.lower()) or []
        if not hits:
            raise LookupError(f"{what} {name!r} not found in {_names(self.folders)}")
        if len(hits) > 1:
            raise LookupError(f"{what} {name!r} is in several folders: {', '.join(map(_short, hits[:4]))}")
        return hits[0]

    def mask(self, image: Path, what: str) -> Path:
        stem = image.stem.lower()
        hits = [f for suffix in MASK_SUFFIXES for f in self.by_stem.get(stem + suffix, [])]
        if not hits:
            tried = ", ".join(f"{image.stem}{s}.png" for s in MASK_SUFFIXES)
            raise LookupError(f"no {what} for {_short(image)} (looked for {tried} in {_names(self.folders)})")
        if len(hits) > 1:
            raise LookupError(f"several {what}s for {_short(image)}: {', '.join(map(_short, hits[:4]))}")
        return hits[0]


def _short(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _names(folders: tuple[Path, ...]) -> str:
    return ", ".join(f.name + "/" for f in folders) or "no folder"


def find_folders(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{prefix: {"images": [...], "masks": [...]}} of the release's folders under `root`."""
    found: dict[str, dict[str, list[Path]]] = defaultdict(lambda: {"images": [], "masks": []})
    for folder in sorted(Path(root).iterdir()):
        match = _FOLDER.fullmatch(folder.name)
        if match and folder.is_dir():
            kind = "masks" if match[2].lower().startswith("mask") else "images"
            found[match[1].lower()][kind].append(folder)
    return dict(found)


def _fields(line: str, split: str) -> list[str]:
    """Tab-separated fields, or whitespace-separated with the category as the rest of the line."""
    if "\t" in line:
        return [p.strip() for p in line.split("\t")]
    return line.split(None, 2 if split == "bgpair" else 1)


def _split_files(root: Path, split: str, folders: dict) -> tuple[Files, Files]:
    """The images and masks a split's lines are matched against: its own folders; a pair list whose
    split has none uses every image folder (a name found twice is then reported, not guessed)."""
    own = folders.get(split)
    chosen = [own] if own else list(folders.values())
    return (Files.index([f for c in chosen for f in c["images"]]), Files.index([f for c in chosen for f in c["masks"]]))


def list_bg60k(root: Path, split: str = "bg60k", mask_threshold: int = ALPHA_THRESHOLD) -> Listing:
    """One list file of the release -> the items whose files all matched, and every other line rejected
    with its reason; files the list does not account for are in `Listing.unmatched`."""
    root = Path(root)
    if split not in LIST_FILES:
        raise ValueError(f"split must be one of {', '.join(LIST_FILES)}, got {split!r}")
    info = root / LIST_FILES[split]
    if not info.is_file():
        raise FileNotFoundError(f"{info}: not found (is {root} the folder the BG60k release unpacks to?)")
    images, masks = _split_files(root, split, find_folders(root))
    fields = 3 if split == "bgpair" else 2
    items, rejected, seen, named = [], [], set(), set()
    for number, raw in enumerate(info.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{info.name}:{number}: {line}"
        parts = _fields(line, split)
        if len(parts) != fields or not all(parts):
            rejected.append({"input": where, "reason": f"expected {fields} fields (image, "
                                                       f"{'reference, ' if split == 'bgpair' else ''}category)"})
            continue
        names, category = parts[:-1], " ".join(parts[-1].split())
        named.update(Path(n).stem.lower() for n in names)
        reason = next((r for r in map(safe_name, names) if r), None)
        # A target may pair with several references: a pair's id names both.
        item_id = "__".join(Path(n).stem for n in names)
        if reason is None and item_id.lower() in seen:
            reason = f"duplicate {'pair' if split == 'bgpair' else 'image'} {' / '.join(names)!r}"
        try:
            if reason:
                raise LookupError(reason)
            image = images.image(names[0], "image")
            files = {"image": image, "mask": masks.mask(image, "mask")}
            if split == "bgpair":
                ref = images.image(names[1], "reference image")
                files.update(ref_id=Path(names[1]).stem, ref_image=ref, ref_mask=masks.mask(ref, "reference mask"))
        except LookupError as e:
            rejected.append({"input": where, "reason": str(e)})
            continue
        seen.add(item_id.lower())
        items.append(InputItem(item_id, category, source=f"bg60k/{split}", mask_threshold=mask_threshold, **files))
    return Listing(items, rejected, _unmatched(root, images, masks, None if split == "bgpair" else named, info.name))


def _unmatched(root: Path, images: Files, masks: Files, named: set[str] | None, list_name: str) -> list[dict]:
    """Masks without an image and, for a split's own list (`named`: the stems it lists), images it does
    not name. A pair list names a subset of the images, so its unnamed images are not reported."""
    def files(index: Files) -> list[Path]:
        return sorted(p for paths in index.by_name.values() for p in paths)

    image_stems = set(images.by_stem)
    out = [{"file": str(path.relative_to(root)), "reason": "mask with no image"} for path in files(masks)
           if not any(path.stem.lower().removesuffix(s) in image_stems for s in MASK_SUFFIXES)]
    if named is not None:
        out += [{"file": str(path.relative_to(root)), "reason": f"image not listed in {list_name}"}
                for path in files(images) if path.stem.lower() not in named]
    return out


def describe(root: Path, listings: dict[str, Listing]) -> str:
    """What the reader found: the folders with their file counts and, per list file, how many lines
    matched their files."""
    root = Path(root)
    lines = [f"BG60k release at {root}:"]
    for prefix, kinds in sorted(find_folders(root).items()):
        for kind, folders in kinds.items():
            if folders:
                lines.append(f"  {prefix} {kind}: {Files.index(folders).count} files in "
                             f"{', '.join(f.name + '/' for f in folders)}")
    for split, listing in listings.items():
        lines.append(f"  {LIST_FILES[split]}: {len(listing.items)} of {listing.num_inputs} lines matched an image "
                     f"and a mask{' (and the reference)' if split == 'bgpair' else ''}")
        if listing.unmatched:
            first = listing.unmatched[0]
            lines.append(f"    {len(listing.unmatched)} files unmatched (first: {first['file']}: {first['reason']})")
    return "\n".join(lines)


def list_all(root: Path, mask_threshold: int = ALPHA_THRESHOLD) -> dict[str, Listing]:
    """The listing of every list file present under `root`."""
    return {split: list_bg60k(root, split, mask_threshold) for split, file in LIST_FILES.items()
            if (Path(root) / file).is_file()}


def check_match(split: str, listing: Listing, min_match: float = MIN_MATCH, option: str = "--min-match") -> None:
    """Raise LookupError naming the first unmatched lines when fewer than `min_match` (set by `option`) of them
    matched."""
    if listing.num_inputs and len(listing.items) >= min_match * listing.num_inputs:
        return
    first = "; ".join(f"{r['input']}: {r['reason']}" for r in listing.rejected[:3])
    raise LookupError(f"only {len(listing.items)} of {listing.num_inputs} lines of {LIST_FILES[split]} matched "
                      f"an image and a mask (at least {min_match:.0%} needed, {option}); nothing was written. "
                      f"First unmatched: {first or 'the list is empty'}")
