"""BG60k / folder listings -> records: every bad input rejected with its reason, the rest readable."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgjax.cli import main
from bgjax.data.bg60k import list_bg60k
from bgjax.data.convert import write_dataset
from bgjax.data.example import decode_example
from bgjax.data.images import decode_mask, decode_rgb
from bgjax.data.records import RecordError, read_records, read_tfrecord
from bgjax.data.sources import list_folder


def _photo(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _cutout(h=24, w=32, box=(4, 6, 14, 20), alpha=True):
    a = np.zeros((h, w), np.uint8)
    a[box[0]:box[2], box[1]:box[3]] = 255
    if not alpha:
        return Image.fromarray(np.stack([a] * 3, -1), "RGB")
    return Image.fromarray(np.dstack([_photo(h, w, 9), a]), "RGBA")


def _save_mask(folder: Path, stem: str, h=24, w=32, box=(4, 6, 14, 20), alpha=True, suffix="_mask"):
    _cutout(h, w, box, alpha).save(folder / f"{stem}{suffix}.png")


def make_bg60k(root: Path) -> dict[str, str]:
    """A folder laid out like the BG60k release: `bg60k_imgs_0/161.png` with `bg60k_masks_0/161_mask.png`
    (RGBA cut-outs), a second `bg60k_imgs_1` / `bg60k_masks_1` pair, `bg1k_imgs/` / `bg1k_masks/` without
    the index suffix, tab-separated list files, plus every quirk the reader must reject with a reason.
    Returns {image id: expected rejection reason fragment, or "" when the input must be written}."""
    imgs, masks, imgs1, masks1 = (root / n for n in ("bg60k_imgs_0", "bg60k_masks_0", "bg60k_imgs_1",
                                                     "bg60k_masks_1"))
    for d in (imgs, masks, imgs1, masks1, root / "bg1k_imgs", root / "bg1k_masks"):
        d.mkdir(parents=True)
    expect, lines = {}, []

    def add(name, category, image, mask="cutout", folder=imgs, reason="", line=None):
        stem = Path(name).stem
        image.save(folder / name)
        if mask == "cutout":
            _save_mask(masks1 if folder == imgs1 else masks, stem, *np.asarray(image).shape[:2])
        elif mask is not None:
            mask.save(masks / f"{stem}_mask.png")
        expect[stem] = reason
        lines.append(line or f"{name}\t{category}")

    add("0.png", "rice cooker", Image.fromarray(_photo()))
    add("161.png", "electric kettle with lid", Image.fromarray(_photo(seed=2)), folder=imgs1,
        line="161 electric kettle with lid")  # no extension, whitespace separated, second folder
    add("2.jpg", "rice cooker", Image.fromarray(_photo(seed=3)).convert("CMYK"))  # a JPEG among the PNGs
    add("3.png", "lamp", Image.fromarray(_photo(seed=4)[..., 0], "L"))
    add("4.png", "lamp", Image.fromarray(_photo(seed=5)).convert("P"))
    add("5.png", "lamp", Image.fromarray(_photo(seed=6)[..., 0].astype(np.uint16) * 257))
    rotated = Image.fromarray(_photo(32, 24, seed=7))  # stored sideways; EXIF says rotate 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(imgs / "6.jpg", exif=exif)
    _save_mask(masks, "6")  # the mask is drawn on the upright (24 x 32) photo
    expect["6"] = ""
    lines.append("6.jpg\tlamp")
    add("7.png", "lamp", Image.fromarray(_photo(seed=8)), mask=None, reason="no mask for bg60k_imgs_0/7.png")
    add("8.png", "lamp", Image.fromarray(_photo(seed=9)), mask=_cutout(alpha=False),
        reason="RGB mask without an alpha channel")
    (imgs / "9.png").write_bytes(_png_bytes(_photo(seed=10))[:300])
    _save_mask(masks, "9")
    expect["9"] = "unreadable or truncated"
    lines.append("9.png\tlamp")
    add("10.png", "lamp", Image.fromarray(_photo(30, 40, seed=11)), mask=_cutout(24, 32),
        reason="differs from the image's")
    add("11.png", "lamp", Image.fromarray(_photo(seed=12)), mask=_cutout(box=(0, 0, 0, 0)),
        reason="no product pixels")
    add("12.png", "lamp", Image.fromarray(_photo(seed=13)), mask=_cutout(box=(0, 0, 24, 32)),
        reason="covers the whole image")
    Image.new("L", (8200, 8200)).save(imgs / "13.png")
    _save_mask(masks, "13")
    expect["13"] = "decompression bomb"
    lines.append("13.png\tlamp")
    # Mask-name variants the reader accepts, and one image with two candidate masks (reported, not guessed).
    add("14.png", "lamp", Image.fromarray(_photo(seed=14)), mask=None)
    _save_mask(masks, "14", suffix="-mask")
    expect["14"] = ""
    add("15.png", "lamp", Image.fromarray(_photo(seed=15)), mask=None)
    _save_mask(masks, "15", suffix="")
    expect["15"] = ""
    add("16.png", "lamp", Image.fromarray(_photo(seed=16)), mask=None, reason="several masks for bg60k_imgs_0/16.png")
    _save_mask(masks, "16")
    _save_mask(masks, "16", suffix="-mask")
    # Files no line accounts for: a mask without its image, an image the list does not name.
    _save_mask(masks1, "900")
    Image.fromarray(_photo(seed=17)).save(imgs1 / "901.png")
    lines += ["0.png\trice cooker", "../../etc/passwd\tlamp", "lonely-name-without-category"]
    (root / "bg60k_info.txt").write_text("\n".join(lines) + "\n")
    # BG1K: its own folders, without the index suffix; its 0.png is another image than BG60k's 0.png.
    for stem, seed in (("0", 20), ("1", 21)):
        Image.fromarray(_photo(seed=seed)).save(root / "bg1k_imgs" / f"{stem}.png")
        _save_mask(root / "bg1k_masks", stem)
    (root / "bg1k_info.txt").write_text("0.png\tdesk lamp\n1.png\tcoffee mug\n")
    # A pair list: its names are looked up in every image folder; 0.png is in two of them.
    (root / "bgpair_info.txt").write_text("3.png\t161.png\tlamp\n3.png\tghost.png\tlamp\n"
                                          "0.png\t161.png\trice cooker\n")
    return expect


def _png_bytes(array):
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bg60k(tmp_path_factory):
    root = tmp_path_factory.mktemp("bg60k")
    return root, make_bg60k(root)


def _mentions(text: str, stem: str) -> bool:
    """Whether a rejection's input names the file `stem`.png / .jpg (as a list line or a path)."""
    return re.search(rf"(^|[/\s]){re.escape(stem)}\.(png|jpg)", text) is not None


@pytest.mark.parametrize("fmt", ["arrayrecord", "tfrecord"])
def test_bg60k_release_layout_converts_and_accounts_for_every_input(bg60k, tmp_path, fmt, capsys):
    root, expect = bg60k
    out = tmp_path / "out"
    assert main(["data", "bg60k", "--root", str(root), "--out", str(out), "--format", fmt,
                 "--records-per-shard", "4", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    # What the reader found, before writing: folders with counts, matched lines per list file.
    assert "bg60k images: 18 files in bg60k_imgs_0/, bg60k_imgs_1/" in printed
    assert "bg1k masks: 2 files in bg1k_masks/" in printed
    assert "bg60k_info.txt: 15 of 20 lines matched" in printed
    assert "bg1k_info.txt: 2 of 2 lines matched" in printed and "bgpair_info.txt: 1 of 3 lines matched" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_inputs"] == len(expect) + 3 == m["num_written"] + len(m["rejected"])
    for stem, fragment in expect.items():
        if fragment:
            reasons = [r["reason"] for r in m["rejected"] if _mentions(r["input"], stem)]
            assert len(reasons) == 1 and fragment in reasons[0], (stem, reasons)
    listing_reasons = " | ".join(r["reason"] for r in m["rejected"] if "bg60k_info.txt:" in r["input"])
    assert "duplicate image '0.png'" in listing_reasons
    assert "is a path" in listing_reasons and "expected 2 fields" in listing_reasons
    assert m["categories"] == {"electric kettle with lid": 0, "lamp": 1, "rice cooker": 2}
    assert sorted((u["file"], u["reason"]) for u in m["unmatched"]) == [
        ("bg60k_imgs_1/901.png", "image not listed in bg60k_info.txt"),
        ("bg60k_masks_1/900_mask.png", "mask with no image")]

    written = {}
    for shard in m["shards"]:
        for rec in read_records(out / shard["path"]):
            ex = decode_example(rec)
            written[ex["id"][0].decode()] = ex
    assert sorted(written) == sorted(s for s, f in expect.items() if not f)
    assert sum(s["num_records"] for s in m["shards"]) == m["num_written"] == len(written)
    upright = written["6"]
    assert (upright["height"][0], upright["width"][0]) == (24, 32)
    box = np.zeros((24, 32), np.uint8)
    box[4:14, 6:20] = 255
    for ex in written.values():
        image, mask = decode_rgb(ex["image"][0]), decode_mask(ex["mask"][0])
        assert image.shape == (ex["height"][0], ex["width"][0], 3) and mask.shape == image.shape[:2]
        np.testing.assert_array_equal(mask, box)  # each image got its own mask file's alpha, every variant
        assert ex["category_id"][0] == m["categories"][ex["category"][0].decode()]
    np.testing.assert_array_equal(decode_rgb(written["0"]["image"][0]), _photo())  # BG60k's 0.png, not BG1K's


def test_bg1k_folders_without_index_and_the_alpha_threshold(tmp_path, capsys):
    """bg1k_imgs/[bg1k_imgs/]0.png + bg1k_masks/0_mask.png; alpha above 128 is product (the release's users' reading),
    and --alpha-threshold moves it."""
    root = tmp_path / "release"
    (root / "bg1k_imgs" / "bg1k_imgs").mkdir(parents=True)  # unzipping a folder's archive often nests it
    (root / "bg1k_masks").mkdir()
    Image.fromarray(_photo()).save(root / "bg1k_imgs" / "bg1k_imgs" / "0.png")
    alpha = np.zeros((24, 32), np.uint8)
    alpha[4:14, 6:20] = 255
    alpha[4:14, 20] = 129  # a soft edge: one column just above the threshold, one at it
    alpha[4:14, 21] = 128
    Image.fromarray(np.dstack([_photo(seed=1), alpha]), "RGBA").save(root / "bg1k_masks" / "0_mask.png")
    (root / "bg1k_info.txt").write_text("0.png\tdesk lamp\n")
    counts = {}
    for threshold in (None, 127):
        out = tmp_path / f"out{threshold}"
        extra = [] if threshold is None else ["--alpha-threshold", str(threshold)]
        assert main(["data", "bg60k", "--root", str(root), "--split", "bg1k", "--out", str(out), "--workers", "1",
                     *extra]) == 0
        m = json.loads((out / "manifest.json").read_text())
        mask = decode_mask(decode_example(next(read_records(out / m["shards"][0]["path"])))["mask"][0])
        counts[threshold] = int((mask > 0).sum())
    assert counts == {None: 10 * 15, 127: 10 * 16}


def test_a_layout_that_matches_nothing_stops_and_writes_nothing(tmp_path, capsys):
    """Images and masks in folders the release does not use (the reader's old guess at the layout, inverted):
    no line matches, so the command stops naming the first unmatched lines instead of writing nothing."""
    root = tmp_path / "release"
    (root / "images").mkdir(parents=True)
    (root / "bg60k_masks_0").mkdir()
    for stem in ("0", "1", "2"):
        Image.fromarray(_photo()).save(root / "images" / f"{stem}.png")
        _save_mask(root / "bg60k_masks_0", stem)
    (root / "bg60k_info.txt").write_text("0.png\tlamp\n1.png\tlamp\n2.png\tlamp\n")
    out = tmp_path / "out"
    assert main(["data", "bg60k", "--root", str(root), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "bg60k_info.txt: 0 of 3 lines matched" in captured.out
    assert "only 0 of 3 lines of bg60k_info.txt matched an image and a mask" in captured.err
    assert "bg60k_info.txt:1: 0.png\tlamp: image '0.png' not found in no folder" in captured.err
    assert "nothing was written" in captured.err and not out.exists()
    # Two of three match once the images are where the release puts them; one mask is missing.
    (root / "images").rename(root / "bg60k_imgs_0")
    (root / "bg60k_masks_0" / "2_mask.png").unlink()
    assert main(["data", "bg60k", "--root", str(root), "--out", str(out), "--workers", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["num_written"] == 2
    assert main(["data", "bg60k", "--root", str(root), "--out", str(tmp_path / "strict"), "--min-match", "1"]) == 2
    assert not (tmp_path / "strict").exists()


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


def test_pairs_need_their_reference_and_unique_names(bg60k, tmp_path):
    root, _ = bg60k
    m = write_dataset(list_bg60k(root, "bgpair"), tmp_path, workers=1)
    assert m["num_inputs"] == 3 and m["num_written"] == 1
    reasons = [r["reason"] for r in m["rejected"]]
    assert "reference image 'ghost.png' not found" in reasons[0]
    # 0.png is BG60k's and BG1K's: the pair list does not say which, so the line is reported, not guessed.
    assert "image '0.png' is in several folders: bg1k_imgs/0.png, bg60k_imgs_0/0.png" in reasons[1]
    ex = decode_example(next(read_records(tmp_path / m["shards"][0]["path"])))
    assert ex["id"] == [b"3__161"] and ex["ref_id"] == [b"161"]
    np.testing.assert_array_equal(decode_rgb(ex["ref_image"][0]), _photo(seed=2))
    assert main(["data", "inspect", str(tmp_path), "--num", "1"]) == 0 and (tmp_path / "inspect.png").is_file()


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
    assert "9 records of 20 inputs" in report and "lamp 6" in report and "decompression bomb" in report
    grid = Image.open(tmp_path / "inspect.png")
    assert grid.size == (6 * 128, 4 * 128)  # 4 samples x (image, mask, crop, crop mask, PG ref, PG mask)
