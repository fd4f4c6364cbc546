"""`bgjax eval` end to end on tiny BG1K / BG-pair record folders, a tiny random bgjax model and random-weight
metric networks (the numbers mean nothing; the harness, the files and the self-checks do)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig as TorchCLIPVisionConfig
from transformers import CLIPVisionModelWithProjection as TorchCLIPVision

from bgjax.cli import main
from bgjax.data.example import encode_example
from bgjax.data.images import encode_png
from bgjax.data.records import TFRecordWriter
from bgjax.demo import MODEL
from bgjax.eval.clip_similarity import mask_products
from bgjax.eval.clip_vision import preprocess
from bgjax.eval.features import clip_pixels, fid_pixels
from bgjax.eval.fid import clean_resize, frechet_distance, frechet_distance_of_features
from bgjax.eval.harness import read_split, variant_pipeline
from bgjax.sampling.pipeline import BackgroundPipeline
from tests.torch_fid_inception import FIDInceptionV3 as TorchFIDInception
from tests.torch_fid_inception import randomize_inception
from tests.torch_reference import randomize

# category -> background colour of the synthetic ads; "teapot" is unknown to the model (an error row)
COLOURS = {"rice cooker": (200, 60, 60), "desk lamp": (60, 200, 60), "coffee mug": (60, 60, 200),
           "teapot": (90, 90, 90)}
BG1K = [("1", "desk lamp"), ("2", "desk lamp"), ("3", "rice cooker"), ("4", "teapot"), ("5", "coffee mug")]
PAIRS = [("1", "2", "desk lamp"), ("3", "5", "rice cooker"), ("5", "3", "coffee mug")]
STEPS = "2"


@pytest.fixture(scope="module")
def model() -> Path:
    """The bundled model (CG, PG, per-category identifiers for bgjax's synthetic categories)."""
    return MODEL


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory) -> dict[str, Path]:
    """Random-weight CLIP (tiny) and FID Inception, converted by `bgjax metric-weights` as real ones are."""
    root = tmp_path_factory.mktemp("metric_weights")
    clip = randomize(TorchCLIPVision(TorchCLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=32, patch_size=8,
                                                           projection_dim=16)))
    clip.save_pretrained(root / "clip_src")
    torch.save(randomize_inception(TorchFIDInception()).state_dict(), root / "pt_inception.pth")
    assert main(["metric-weights", "clip", str(root / "clip_src"), "--out", str(root / "clip")]) == 0
    assert main(["metric-weights", "inception", str(root / "pt_inception.pth"), "--out", str(root / "inception")]) == 0
    return {"clip": root / "clip", "inception": root / "inception"}


def _ad(name: str, category: str) -> tuple[np.ndarray, np.ndarray]:
    """A 48 x 48 ad: a category-coloured background with texture, a product rectangle, its RGBA cut-out."""
    rng = np.random.default_rng(int(name))
    image = np.clip(np.asarray(COLOURS[category]) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
    image[14:34, 16:32] = rng.integers(0, 256, 3)
    cutout = np.zeros((48, 48, 4), np.uint8)
    cutout[14:34, 16:32] = np.concatenate([image[14:34, 16:32], np.full((20, 16, 1), 255, np.uint8)], axis=-1)
    return image, cutout


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A folder laid out like the BG60k release (bg1k_imgs/1.png, bg1k_masks/1_mask.png RGBA cut-outs, tab-separated
    bg1k_info.txt and bgpair_info.txt) converted by `bgjax data bg60k`."""
    root = tmp_path_factory.mktemp("bg60k")
    (root / "bg1k_imgs").mkdir()
    (root / "bg1k_masks").mkdir()
    categories = dict(BG1K)
    for name, category in BG1K:
        image, cutout = _ad(name, category)
        Image.fromarray(image).save(root / "bg1k_imgs" / f"{name}.png")
        Image.fromarray(cutout).save(root / "bg1k_masks" / f"{name}_mask.png")
    (root / "bg1k_info.txt").write_text("".join(f"{n}.png\t{c}\n" for n, c in BG1K))
    (root / "bgpair_info.txt").write_text("".join(f"{a}.png\t{b}.png\t{c}\n" for a, b, c in PAIRS))
    assert all(categories[a] == c for a, _, c in PAIRS)
    out = {}
    for split in ("bg1k", "bgpair"):
        out[split] = root / f"records_{split}"
        assert main(["data", "bg60k", "--root", str(root), "--split", split, "--out", str(out[split]),
                     "--workers", "1"]) == 0
        manifest = json.loads((out[split] / "manifest.json").read_text())
        assert manifest["num_written"] == len(BG1K if split == "bg1k" else PAIRS), manifest["rejected"]
    return out


def _eval(model: Path, data: Path, split: str, out: Path, weights: dict, variants: str, *extra: str) -> int:
    return main(["eval", "--model", str(model), "--data", str(data), "--split", split, "--out", str(out),
                 "--clip", str(weights["clip"]), "--inception", str(weights["inception"]), "--variants", variants,
                 "--steps", STEPS, "--feature-batch-size", "4", *extra])


def _record(monkeypatch, method: str) -> list:
    """Calls of a BackgroundPipeline method: (pipeline, args, kwargs)."""
    calls = []
    original = getattr(BackgroundPipeline, method)

    def recording(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BackgroundPipeline, method, recording)
    return calls


def test_eval_bg1k_end_to_end_and_resume(model, data, metric_weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bg1k"
    calls, variants = _record(monkeypatch, "generate"), _record(monkeypatch, "variant")
    status = _eval(model, data["bg1k"], "bg1k", out, metric_weights, "sd,cg,cg_pg,real")
    assert status == 1  # "teapot" is not a category of the model: CG reports it
    printed = capsys.readouterr().out
    assert len(calls) == 5 + 4
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["variant"], e["id"]) for e in errors] == [("cg", "4")]
    assert "unknown category 'teapot'" in errors[0]["reason"]

    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["variants"]
    assert metrics["variant_order"] == ["sd", "cg", "cg_pg", "real"] and set(rows) == set(metrics["variant_order"])
    for name in ("sd", "cg", "real"):
        assert {"clip_similarity", "fid", "num_images"} <= set(rows[name])
        assert -1 <= rows[name]["clip_similarity"] <= 1 and rows[name]["fid"] >= -1e-6
    assert [rows[v]["num_images"] for v in ("sd", "cg", "real")] == [5, 4, 5]
    assert rows["cg_pg"]["num_images"] == 0 and "no reference images" in rows["cg_pg"]["skipped"]
    assert metrics["num_items"] == 5 and metrics["fid_reference"]["num_images"] == 5
    # The real images through the same path: CLIP-sim of an image with itself is 1, FID of a set with itself 0.
    assert abs(rows["real"]["clip_similarity"] - 1) < 1e-5
    assert abs(rows["real"]["fid"]) < 1e-9 * rows["sd"]["fid"]
    assert rows["sd"]["clip_similarity"] < 1 - 1e-4

    table = (out / "table.md").read_text()
    assert table.startswith("# Table 1: BG1K (5 products x 1 images, 2 dpmpp_2m steps")
    for label in ("SD", "CG (ours)", "Real images"):
        assert sum(line.startswith(f"| {label} | ") for line in table.splitlines()) == 1
    assert "| CG + PG (ours) | — | — | 0 |" in table and table in printed
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 5 + 4 + 5
    assert Image.open(out / "tsne.png").size[0] > 400
    tsne = json.loads((out / "tsne.json").read_text())
    assert len(tsne["CG (ours)"]["x"]) == 4 and len(tsne["real images"]["x"]) == 5
    assert Image.open(out / "contact_sheet_cg.png").size == (2 * 128, 4 * (128 + 18))  # real, generated
    (png,) = (out / "images" / "cg").glob("1_*_0.png")
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["variant"] == "cg" and sidecar["lambda_pg"] is None and sidecar["image_index"] == 0
    assert sidecar["prompt"] == "A photo of desk lamp, in the background of *"

    # The variants' pipelines share the loaded model: sd without branches or identifiers; controlnet is CG with
    # plain cross-attention.
    base = variants[0][0]
    sd, cg = (variant_pipeline(base, v) for v in ("sd", "cg"))
    assert not sd.has_cg and not sd.has_pg and sd.params["identifiers"] is None and sd.vocabulary is None
    assert cg.has_cg and not cg.has_pg and cg.models.denoiser.cg.region_mode == "mask_guided"
    controlnet = variant_pipeline(base, "controlnet")
    assert controlnet.models.denoiser.cg.region_mode == "none" and controlnet.models.denoiser.unet.region_mode == "none"
    assert controlnet.models.denoiser.cg.config == cg.models.denoiser.cg.config and not controlnet.has_pg

    # Rerun: nothing is generated (the model is not even loaded), the files stay, the metrics are recomputed.
    # (Only sd and real: cg would try its failed record again, which loads the model.)
    pngs = sorted((out / "images").rglob("*.png"))
    times = [p.stat().st_mtime_ns for p in pngs]
    (out / "metrics.json").unlink()
    calls.clear()
    variants.clear()
    assert _eval(model, data["bg1k"], "bg1k", out, metric_weights, "sd,real") == 0
    assert calls == [] and variants == []
    assert "sd: generated 0 items, 5 already done (skipped)" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted((out / "images").rglob("*.png"))] == times
    again = json.loads((out / "metrics.json").read_text())["variants"]
    for name in ("sd", "real"):
        assert again[name]["clip_similarity"] == pytest.approx(rows[name]["clip_similarity"], abs=1e-6)
        assert again[name]["fid"] == pytest.approx(rows[name]["fid"], rel=1e-6)


def test_eval_bgpair_uses_references(model, data, metric_weights, tmp_path):
    out = tmp_path / "bgpair"
    assert _eval(model, data["bgpair"], "bgpair", out, metric_weights, "cg,cg_pg,real") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["variants"]
    assert metrics["clip_similarity_against"] == "reference image"
    assert [rows[v]["num_images"] for v in ("cg", "cg_pg", "real")] == [3, 3, 3]
    assert abs(rows["real"]["fid"]) < 1e-9 * rows["cg"]["fid"]
    assert rows["real"]["clip_similarity"] < 1 - 1e-4  # a target against its (different) reference
    table = (out / "table.md").read_text()
    assert table.startswith("# Table 2: BG-pair (3 products")
    assert "| CG + PG (ours) | " in table and "vs the reference image" in table
    sidecars = [json.loads(p.read_text()) for p in sorted((out / "images" / "cg_pg").glob("*.json"))]
    assert sorted(s["reference_id"] for s in sidecars) == ["2", "3", "5"]
    assert all(s["lambda_pg"] == 1.0 for s in sidecars)
    assert Image.open(out / "contact_sheet_cg_pg.png").size == (3 * 128, 3 * (128 + 18))  # real, reference, image


def test_reference_lookup_by_ref_id(tmp_path):
    """Records without embedded references find them by id in the same folder; unknown ones are reported."""
    image, cutout = _ad("1", "desk lamp")
    png, mask = encode_png(image), encode_png((cutout[..., 3] > 0).astype(np.uint8) * 255)
    w = TFRecordWriter(tmp_path / "pairs-00000-of-00001.tfrecord")
    for rid, ref in (("x", None), ("y__x", "x"), ("z", "missing")):
        w.write(encode_example({"image": png, "mask": mask, "category": "lamp", "category_id": 0, "id": rid,
                                "ref_id": ref}))
    w.close()
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"path": "pairs-00000-of-00001.tfrecord"}]}))
    items, problems = read_split(tmp_path, "bgpair")
    assert [i.id for i in items] == ["y__x"] and items[0].reference == png
    assert [p["id"] for p in problems] == ["x", "z"] and "'missing' is not embedded" in problems[1]["reason"]
    assert [i.id for i in read_split(tmp_path, "bg1k", num=2)[0]] == ["x", "y__x"]


@pytest.mark.parametrize("hw", [(48, 40), (250, 333)])
def test_host_preprocessing_matches_the_jax_metrics(hw):
    """The per-image host resizes equal `preprocess(mask_products(.))` and `clean_resize` (float64 vs float32:
    a CLIP value on a rounding boundary may flip one grey level)."""
    rng = np.random.default_rng(hw[0])
    image = rng.integers(0, 256, (*hw, 3), np.uint8)
    mask = np.zeros(hw, np.float32)
    mask[hw[0] // 4:hw[0] // 2, hw[1] // 3:hw[1] // 2] = 1
    want = np.asarray(preprocess(mask_products(jnp.asarray(image[None]), jnp.asarray(mask[None])), 32))[0]
    got = (clip_pixels(image, mask, 32) / 255.0 - np.asarray([0.48145466, 0.4578275, 0.40821073])) / \
        np.asarray([0.26862954, 0.26130258, 0.27577711])
    levels = np.abs(got - want) * np.asarray([0.26862954, 0.26130258, 0.27577711]) * 255
    assert levels.max() <= 1 + 1e-3 and (levels > 0.5).mean() <= 1e-3
    np.testing.assert_allclose(fid_pixels(image), np.asarray(clean_resize(jnp.asarray(image[None])))[0], atol=2e-3)


def test_frechet_distance_of_features_matches_the_covariance_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 16)) @ rng.normal(size=(16, 16)) + 1
    b = rng.normal(size=(70, 16)) @ rng.normal(size=(16, 16))
    want = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance_of_features(a, b) == pytest.approx(want, rel=1e-10)
    assert abs(frechet_distance_of_features(a[:5], a[:5])) < 1e-12 * np.trace(np.cov(a[:5], rowvar=False))
