"""BG60k / folder listings -> records: every bad input rejected with its reason, the rest readable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgjax.cli import main
from bgjax.data.convert import write_dataset
from bgjax.data.example import decode_example
from bgjax.data.images import decode_mask, decode_rgb
from bgjax.data.records import RecordError, read_records, read_tfrecord
from bgjax.data.sources import list_bg60k, list_folder


def _photo(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _cutout(h=24, w=32, box=(4, 6, 14, 20), alpha=True):
    a = np.zeros((h, w), np.uint8)
    a[box[0]:box[2], box[1]:box[3]] = 255
    if not alpha:
        return Image.fromarray(np.stack([a] * 3, -1), "RGB")
    return Image.fromarray(np.dstack([_photo(h, w, 9), a]), "RGBA")


def make_bg60k(root: Path) -> dict[str, str]:
    """A BG60k-style folder holding every kind of input the issue lists. Returns {image id: expected
    rejection reason fragment, or "" when the input must be written}."""
    imgs, masks, imgs1, masks1 = (root / n for n in ("bg60k_imgs_0", "bg60k_masks_0", "bg60k_imgs_1",
                                                     "bg60k_masks_1"))
    for d in (imgs, masks, imgs1, masks1):
        d.mkdir(parents=True)
    expect, lines = {}, []

    def add(name, category, image=None, mask="cutout", folder=imgs, reason="", line=None):
        stem = Path(name).stem
        if image is not None:
            image.save(folder / name)
        if mask == "cutout":
            _cutout(*np.asarray(image).shape[:2]).save((masks if folder == imgs else masks1) / f"{stem}.png")
        elif mask is not None:
            mask.save(masks / f"{stem}.png")
        expect[stem] = reason
        lines.append(line or f"{name}\t{category}")

    add("plain.jpg", "rice cooker", Image.fromarray(_photo()))
    add("second.png", "electric kettle with lid", Image.fromarray(_photo(seed=2)), folder=imgs1,
        line="second electric kettle with lid")  # no extension, whitespace separated, other folder
    add("cmyk.jpg", "rice cooker", Image.fromarray(_photo(seed=3)).convert("CMYK"))
    add("grey.png", "lamp", Image.fromarray(_photo(seed=4)[..., 0], "L"))
    add("palette.png", "lamp", Image.fromarray(_photo(seed=5)).convert("P"))
    add("deep.png", "lamp", Image.fromarray(_photo(seed=6)[..., 0].astype(np.uint16) * 257))
    rotated = Image.fromarray(_photo(32, 24, seed=7))  # stored sideways; EXIF says rotate 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(imgs / "exif.jpg", exif=exif)
    _cutout(24, 32).save(masks / "exif.png")  # the mask is drawn on the upright (24 x 32) photo
    expect["exif"] = ""
    lines.append("exif.jpg\tlamp")
    add("nomask.jpg", "lamp", Image.fromarray(_photo(seed=8)), mask=None, reason="mask 'nomask' not found")
    add("rgbmask.jpg", "lamp", Image.fromarray(_photo(seed=9)), mask=_cutout(alpha=False),
        reason="RGB mask without an alpha channel")
    (imgs / "cut.jpg").write_bytes(_jpeg_bytes(_photo(seed=10))[:300])
    _cutout().save(masks / "cut.png")
    expect["cut"] = "unreadable or truncated"
    lines.append("cut.jpg\tlamp")
    add("bigger.jpg", "lamp", Image.fromarray(_photo(30, 40, seed=11)), mask=_cutout(24, 32),
        reason="differs from the image's")
    add("empty.jpg", "lamp", Image.fromarray(_photo(seed=12)), mask=_cutout(box=(0, 0, 0, 0)),
        reason="no product pixels")
    add("full.jpg", "lamp", Image.fromarray(_photo(seed=13)), mask=_cutout(box=(0, 0, 24, 32)),
        reason="covers the whole image")
    Image.new("L", (8200, 8200)).save(imgs / "bomb.png")
    _cutout().save(masks / "bomb.png")
    expect["bomb"] = "decompression bomb"
    lines.append("bomb.png\tlamp")
    lines += ["plain.jpg\trice cooker", "../../etc/passwd\tlamp", "lonely-name-without-category"]
    (root / "bg60k_info.txt").write_text("\n".join(lines) + "\n")
    (root / "bgpair_info.txt").write_text("plain.jpg\tsecond.png\trice cooker\nplain.jpg\tghost.jpg\trice cooker\n")
    return expect


def _jpeg_bytes(array):
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bg60k(tmp_path_factory):
    root = tmp_path_factory.mktemp("bg60k")
    return root, make_bg60k(root)


@pytest.mark.parametrize("fmt", ["arrayrecord", "tfrecord"])
def test_bg60k_conversion_accounts_for_every_input(bg60k, tmp_path, fmt):
    root, expect = bg60k
    out = tmp_path / "out"
    assert main(["data", "bg60k", "--root", str(root), "--out", str(out), "--format", fmt,
                 "--records-per-shard", "4", "--workers", "2"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_inputs"] == len(expect) + 3 == m["num_written"] + len(m["rejected"])
    for stem, fragment in expect.items():
        if fragment:
            reasons = [r["reason"] for r in m["rejected"] if f"{stem}." in r["input"]]
            assert len(reasons) == 1 and fragment in reasons[0], (stem, reasons)
    listing_reasons = " | ".join(r["reason"] for r in m["rejected"] if ":" in r["input"])
    assert "duplicate image 'plain.jpg'" in listing_reasons
    assert "is a path" in listing_reasons and "expected 2 fields" in listing_reasons
    assert m["categories"] == {"electric kettle with lid": 0, "lamp": 1, "rice cooker": 2}

    written = {}
    for shard in m["shards"]:
        for rec in read_records(out / shard["path"]):
            ex = decode_example(rec)
            written[ex["id"][0].decode()] = ex
    assert sorted(written) == sorted(s for s, f in expect.items() if not f)
    assert sum(s["num_records"] for s in m["shards"]) == m["num_written"] == len(written)
    upright = written["exif"]
    assert (upright["height"][0], upright["width"][0]) == (24, 32)
    for ex in written.values():
        image, mask = decode_rgb(ex["image"][0]), decode_mask(ex["mask"][0])
        assert image.shape == (ex["height"][0], ex["width"][0], 3) and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) == {0, 255}
        assert ex["category_id"][0] == m["categories"][ex["category"][0].decode()]
    plain = written["plain"]
    assert plain["image"][0] == (root / "bg60k_imgs_0" / "plain.jpg").read_bytes()  # upright RGB JPEG kept as is


def test_tfrecords_read_by_an_independent_reader_and_crcs_verified(bg60k, tmp_path):
    from tfrecord.reader import tfrecord_loader

    root, _ = bg60k
    m = write_dataset(list_bg60k(root), tmp_path, "tfrecord", records_per_shard=100, workers=1)
    path = tmp_path / m["shards"][0]["path"]
    theirs = list(tfrecord_loader(str(path), None, description={"id": "byte", "category_id": "int",
                                                               "height": "int", "category": "byte"}))
    ours = [decode_example(r) for r in read_tfrecord(path)]
    assert [bytes(t["id"]).decode() for t in theirs] == [o["id"][0].decode() for o in ours]
    assert [int(t["category_id"][0]) for t in theirs] == [o["category_id"][0] for o in ours]
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecordError, match="CRC mismatch"):
        list(read_tfrecord(path))


def test_rerun_skips_verified_shards_and_redoes_damaged_ones(bg60k, tmp_path):
    root, _ = bg60k
    first = write_dataset(list_bg60k(root), tmp_path, records_per_shard=3, workers=1)
    paths = [tmp_path / s["path"] for s in first["shards"]]
    stamps = [p.stat().st_mtime_ns for p in paths]
    paths[1].write_bytes(b"damaged")
    second = write_dataset(list_bg60k(root), tmp_path, records_per_shard=3, workers=1)
    assert second == first
    assert [p.stat().st_mtime_ns == s for p, s in zip(paths, stamps, strict=True)] == [
        i != 1 for i in range(len(paths))]


def test_pairs_need_their_reference(bg60k, tmp_path):
    root, _ = bg60k
    m = write_dataset(list_bg60k(root, "bgpair"), tmp_path, workers=1)
    assert m["num_inputs"] == 2 and m["num_written"] == 1
    assert "reference image 'ghost.jpg' not found" in m["rejected"][0]["reason"]
    ex = decode_example(next(read_records(tmp_path / m["shards"][0]["path"])))
    assert ex["ref_id"] == [b"second"] and decode_rgb(ex["ref_image"][0]).shape == (24, 32, 3)


def test_folder_listing_with_cutouts_csv_and_broken_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    _cutout().save(tmp_path / "img" / "a.png")  # an RGBA cut-out: its alpha is the mask
    Image.fromarray(_photo()).save(tmp_path / "img" / "b.jpg")  # no alpha, no mask: rejected
    with open(tmp_path / "cats.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "category"], ["a.png", "desk  lamp"], ["b.jpg", "lamp"], ["c.jpg", ""]])
    m = write_dataset(list_folder(tmp_path / "img", tmp_path / "cats.csv"), tmp_path / "out", workers=1)
    assert (m["num_inputs"], m["num_written"]) == (3, 1)
    assert sorted(r["reason"].split(":")[-1].strip() for r in m["rejected"]) == [
        "no category", "no mask file and no alpha channel"]
    assert m["categories"] == {"desk lamp": 0, "lamp": 1}  # fixed from the listing, before decoding
    (tmp_path / "cats.jsonl").write_text('{"image": "a.png", "category": "lamp"}\n{not json\n')
    listing = list_folder(tmp_path / "img", tmp_path / "cats.jsonl")
    assert len(listing.items) == 1 and "invalid JSON" in listing.rejected[0]["reason"]


def test_inspect_reports_counts_reasons_and_draws_a_grid(bg60k, tmp_path, capsys):
    root, _ = bg60k
    write_dataset(list_bg60k(root), tmp_path, workers=1)
    assert main(["data", "inspect", str(tmp_path), "--num", "4"]) == 0
    report = capsys.readouterr().out
    assert "7 records of 17 inputs" in report and "lamp 4" in report and "decompression bomb" in report
    grid = Image.open(tmp_path / "inspect.png")
    assert grid.size == (6 * 128, 4 * 128)  # 4 samples x (image, mask, crop, crop mask, PG ref, PG mask)
