"""BackgroundPipeline and `bgjax generate` on a tiny random model (32 px, 3 sampler steps)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgjax import model_dir
from bgjax.cli import main
from bgjax.method.config import MethodConfig
from bgjax.method.store import save_method
from bgjax.sampling.pipeline import BackgroundPipeline
from bgjax.sampling.program import traces
from tests.conftest import METHOD_CATEGORIES
from tests.cpu_env import cpu_env

STEPS = 3
# Compiled programs are shared by shape: every 32 px call below with num_images=2 reuses one.
EIGHT_DEVICES = """
import sys
import numpy as np
import jax
from bgjax.sampling.pipeline import BackgroundPipeline
assert len(jax.local_devices()) == 8
pipe = BackgroundPipeline.from_pretrained(sys.argv[1])
data = np.load(sys.argv[2])
images = pipe(data["image"], data["mask"], "lamp", num_images=4, seed=0, steps=int(sys.argv[4]))
np.save(sys.argv[3], np.stack([np.asarray(im) for im in images]))
"""


@pytest.fixture(scope="module")
def model(method_model) -> Path:
    return method_model


@pytest.fixture(scope="module")
def pipe(model) -> BackgroundPipeline:
    return BackgroundPipeline.from_pretrained(model)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> dict:
    """A 48 x 48 product photo (generated at 32 px, pasted back at 48) with its mask, also as files."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 48, 3), np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[12:34, 14:30] = True
    reference = rng.integers(0, 256, (40, 56, 3), np.uint8)
    reference_mask = np.zeros((40, 56), np.uint8)
    reference_mask[10:30, 20:36] = 255
    Image.fromarray(image).save(folder / "product.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "mask.png")
    Image.fromarray(reference).save(folder / "reference.jpg")
    Image.fromarray(reference_mask).save(folder / "reference_mask.png")
    cutout = np.zeros((20, 20, 4), np.uint8)
    cutout[5:15, 5:15, :3] = rng.integers(0, 256, (10, 10, 3), np.uint8)
    cutout[5:15, 5:15, 3] = 255
    Image.fromarray(cutout).save(folder / "cutout.png")
    np.savez(folder / "photo.npz", image=image, mask=mask)
    return dict(folder=folder, image=image, mask=mask, reference=reference, reference_mask=reference_mask,
                cutout=cutout)


def _arrays(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


@pytest.fixture(scope="module")
def eight_devices(model, photo, tmp_path_factory):
    """The 8-device run, started first so that it overlaps the tests below; waited for where used."""
    out = tmp_path_factory.mktemp("eight") / "images.npy"
    env = cpu_env(8)
    command = [sys.executable, "-c", EIGHT_DEVICES, model, photo["folder"] / "photo.npz", out, str(STEPS)]
    process = subprocess.Popen(command, env=env, cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE, text=True)
    yield process, out
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def first_call(pipe, photo, eight_devices) -> tuple[np.ndarray, int]:
    """Images 0-3 of seed 0 (the reference result of the tests below) and how often that call traced."""
    before = traces()
    images = _arrays(pipe(photo["image"], photo["mask"], "Lamp", num_images=4, seed=0, steps=STEPS))
    return images, traces() - before


@pytest.fixture(scope="module")
def four(first_call) -> np.ndarray:
    return first_call[0]


def test_one_trace_product_pixels_identical_and_seeds(pipe, photo, first_call):
    four, traced = first_call
    assert traced == 1
    assert four.shape == (4, 48, 48, 3) and four.dtype == np.uint8
    for image in four:
        np.testing.assert_array_equal(image[photo["mask"]], photo["image"][photo["mask"]])
    assert np.abs(four[0].astype(int) - four[1]).mean() > 5  # image index matters
    before = traces()
    again = _arrays(pipe(photo["image"], photo["mask"], "lamp", num_images=4, seed=0, steps=STEPS))
    assert traces() == before  # same shapes: no retrace (guidance and lambdas are traced values too)
    np.testing.assert_array_equal(again, four)
    other = _arrays(pipe(photo["image"], photo["mask"], "lamp", num_images=4, seed=1, steps=STEPS, guidance=5.0))
    assert traces() == before
    background = ~photo["mask"]
    assert np.abs(other[0].astype(int) - four[0])[background].mean() > 5


def test_image_k_independent_of_batch(pipe, photo, four):
    two = _arrays(pipe(photo["image"], photo["mask"], "lamp", num_images=2, seed=0, steps=STEPS))
    chunked = _arrays(pipe(photo["image"], photo["mask"], "lamp", num_images=4, seed=0, steps=STEPS, batch_size=2))
    # Tolerance 1 grey level for float rounding that could differ with the batch shape; measured: equal.
    assert np.abs(two.astype(int) - four[:2]).max() <= 1
    assert np.abs(chunked.astype(int) - four).max() <= 1


def test_eight_devices_match_one(four, eight_devices):
    process, out = eight_devices
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    # 4 images padded to 8, one per device. Tolerance 1 grey level; measured: equal.
    assert np.abs(np.load(out).astype(int) - four).max() <= 1


def test_cutout_placed_on_canvas(pipe, photo):
    # scale 10/32 makes the 10 px cut-out exactly 10 px on the 32 px canvas: its pixels must come back as given.
    images = _arrays(pipe(photo["cutout"], category="coffee mug", num_images=2, seed=0, steps=STEPS,
                          placement=(10 / 32, 0.25, 0.75)))
    assert images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(images[:, 19:29, 3:13], np.broadcast_to(photo["cutout"][5:15, 5:15, :3],
                                                                          (2, 10, 10, 3)))
    outside = np.ones((32, 32), bool)
    outside[19:29, 3:13] = False
    assert (images[:, outside] != 255).any(axis=-1).mean() > 0.9  # generated, not the white canvas


def test_reference_changes_the_output(pipe, photo):
    kwargs = dict(num_images=2, seed=0, steps=STEPS)
    plain = _arrays(pipe(photo["image"], photo["mask"], "lamp", **kwargs))
    styled = _arrays(pipe(photo["image"], photo["mask"], "lamp", reference=photo["reference"],
                          reference_mask=photo["reference_mask"], **kwargs))
    background = ~photo["mask"]
    assert np.abs(styled.astype(int) - plain)[:, background].mean() > 2
    # A reference whose alpha marks its product conditions PG exactly like reference + mask.
    rgba = np.dstack([photo["reference"], photo["reference_mask"]])
    a = pipe.prepare(photo["image"], photo["mask"], "lamp", reference=rgba)
    b = pipe.prepare(photo["image"], photo["mask"], "lamp", reference=photo["reference"],
                     reference_mask=photo["reference_mask"])
    np.testing.assert_array_equal(a.pg_cond, b.pg_cond)


def test_style_guidance_drops_pg_from_the_unconditional_pass_only(pipe, photo):
    """With a reference, style guidance changes the images; at guidance 1 (the conditional pass
    alone) it changes nothing, and without a reference it is a no-op (bit-equal)."""
    kwargs = dict(num_images=1, seed=0, steps=STEPS)
    ref = dict(reference=photo["reference"], reference_mask=photo["reference_mask"])
    run = lambda **kw: _arrays(pipe(photo["image"], photo["mask"], "lamp", **kwargs, **kw))  # noqa: E731
    assert np.abs(run(**ref, style_guidance=True).astype(int) - run(**ref)).mean() > 1
    np.testing.assert_allclose(run(**ref, guidance=1.0, style_guidance=True), run(**ref, guidance=1.0), atol=1)
    np.testing.assert_array_equal(run(style_guidance=True), run())


def test_keep_product_holds_the_products_encoding_in_the_cells_it_covers(pipe, photo):
    """keep_product: the final latents of the cells the product's mask covers whole are the VAE's encoding of
    the product (I * M), exactly, and every other cell is generated (differs from it); without it no cell
    is the encoding. The images change off the product and keep its pixels."""
    import jax.numpy as jnp

    from bgjax.sampling import program

    prepared = pipe.prepare(photo["image"], photo["mask"], "lamp")
    factor = pipe.models.vae_factor
    h, w = prepared.mask.shape
    cells = prepared.mask.reshape(h // factor, factor, w // factor, factor).min(axis=(1, 3)) >= 0.5
    assert 0 < cells.sum() < cells.size
    vae = pipe.models.vae
    mean, _ = vae.apply({"params": pipe.params["vae"]}, jnp.asarray(prepared.cg_cond)[None], method=vae.encode)
    encoding = (np.asarray(mean)[0] - vae.config.shift_factor) * vae.config.scaling_factor

    def final_latents(known):
        conditions = pipe._conditions(pipe.inputs.prompt(prepared, None), None, prepared.identifier_row,
                                      prepared.mask, prepared.cg_cond, None, known)
        settings = program.SamplingSettings("dpmpp_2m", STEPS, 7.5, 1.0)
        return program.run(pipe.models, pipe.params, pipe.mesh, pipe.scheduler_config, settings, conditions, 2,
                           0)[0]

    kept, free = final_latents(prepared.cg_cond), final_latents(None)
    for x in kept:
        np.testing.assert_allclose(x[cells], encoding[cells], rtol=1e-5, atol=1e-5)
        assert np.abs(x[~cells] - encoding[~cells]).max(-1).min() > 1e-3
    assert np.abs(free[:, cells] - encoding[cells]).max(-1).min() > 1e-3

    run = lambda **kw: _arrays(pipe(photo["image"], photo["mask"], "lamp", num_images=1, steps=STEPS, **kw))  # noqa: E731
    with_, without = run(keep_product=True), run()
    product = np.asarray(Image.fromarray(photo["mask"]).resize(with_.shape[2:0:-1])) > 0
    np.testing.assert_array_equal(with_[0][product], without[0][product])
    assert np.abs(with_[0][~product].astype(int) - without[0][~product]).mean() > 1


def test_edge_fill_refills_the_latents_at_the_products_edge_before_decoding(pipe, photo):
    """edge_fill: the sampling is unchanged, then the latent cells holding product (and their neighbours) are
    `refill_edge`'s fill of the final latents, the others as sampled, and those latents are what is decoded.
    Through the pipeline the product's pixels stay the input's and the pixels beside it change."""
    import jax.numpy as jnp

    from bgjax.sampling import program
    from bgjax.sampling.edge_fill import edge_cells, refill_edge

    prepared = pipe.prepare(photo["image"], photo["mask"], "lamp")
    factor, vae = pipe.models.vae_factor, pipe.models.vae
    cells = np.asarray(edge_cells(jnp.asarray(prepared.mask)[None], factor))[0]
    assert 0 < cells.sum() < cells.size

    def sampled(edge_fill):
        conditions = pipe._conditions(pipe.inputs.prompt(prepared, None), None, prepared.identifier_row,
                                      prepared.mask, prepared.cg_cond, None, None, edge_fill)
        settings = program.SamplingSettings("dpmpp_2m", STEPS, 7.5, 1.0)
        return program.run(pipe.models, pipe.params, pipe.mesh, pipe.scheduler_config, settings, conditions, 2, 0)

    (plain, _), (filled, images) = sampled(False), sampled(True)
    np.testing.assert_allclose(filled[:, ~cells], plain[:, ~cells], rtol=1e-5, atol=1e-5)
    expected = np.asarray(refill_edge(jnp.asarray(plain), jnp.asarray(prepared.mask)[None].repeat(2, 0), factor))
    np.testing.assert_allclose(filled, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(filled[:, cells] - plain[:, cells]).max() > 1e-2
    decoded = vae.apply({"params": pipe.params["vae"]}, jnp.asarray(filled) / vae.config.scaling_factor
                        + vae.config.shift_factor, method=vae.decode)
    np.testing.assert_allclose(images, (np.clip(np.asarray(decoded), -1, 1) + 1) / 2, atol=1e-4)

    run = lambda **kw: _arrays(pipe(photo["image"], photo["mask"], "lamp", num_images=1, steps=STEPS, **kw))  # noqa: E731
    with_, without = run(edge_fill=True), run()
    product = np.asarray(Image.fromarray(photo["mask"]).resize(with_.shape[2:0:-1])) > 0
    np.testing.assert_array_equal(with_[0][product], without[0][product])
    assert np.abs(with_[0][~product].astype(int) - without[0][~product]).mean() > 1


def test_bad_inputs_name_the_problem(pipe, photo, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="product: unreadable or truncated image"):
        pipe(broken, photo["mask"], "lamp")
    with pytest.raises(ValueError, match=r"mask: size \(48, 40\) differs from the image's \(48, 48\)"):
        pipe(photo["image"], photo["mask"][:40], "lamp")
    with pytest.raises(ValueError, match="unknown category 'teapot'; the model knows: rice cooker, lamp, coffee mug"):
        pipe(photo["image"], photo["mask"], "teapot")
    with pytest.raises(ValueError, match="needs a mask"):
        pipe(photo["image"], category="lamp")
    with pytest.raises(ValueError, match="reference: an image without an alpha channel needs its product mask"):
        pipe(photo["image"], photo["mask"], "lamp", reference=photo["reference"])
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe(photo["image"], photo["mask"], "lamp", size=30)


def test_base_model_and_shared_identifier(model, photo, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(model, base, ignore=shutil.ignore_patterns("cg", "pg", "method.json", "identifiers.safetensors"))
    model_dir.write_manifest(base, ["unet", "vae", "text_encoder"], "test")
    pipe = BackgroundPipeline.from_pretrained(base)
    assert not pipe.has_cg and not pipe.has_pg
    with pytest.warns(UserWarning, match="'any product at all': the model has no learned identifiers"):
        (image,) = pipe(photo["image"], photo["mask"], "any product at all", num_images=1, steps=STEPS)
    np.testing.assert_array_equal(np.asarray(image)[photo["mask"]], photo["image"][photo["mask"]])

    shared = tmp_path / "shared"
    shutil.copytree(model, shared)
    save_method(shared, MethodConfig(identifiers="shared"), METHOD_CATEGORIES, np.zeros((1, 32), np.float32))
    prepared = BackgroundPipeline.from_pretrained(shared).prepare(photo["image"], photo["mask"], "teapot")
    assert prepared.category == "teapot" and prepared.prompt.text.startswith("A photo of teapot")


def _generate_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--num-images", "2", "--steps", str(STEPS), "--out", str(out), *extra]


def test_cli_single_product(model, pipe, photo, tmp_path, capsys):
    f = photo["folder"]
    args = _generate_args(model, tmp_path, "--product", str(f / "product.png"), "--mask", str(f / "mask.png"),
                          "--category", "lamp", "--seed", "0")
    assert main(args) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name.rsplit("_", 1)[1] for p in pngs] == ["0.png", "1.png"]
    want = _arrays(pipe(photo["image"], photo["mask"], "lamp", num_images=2, seed=0, steps=STEPS))
    np.testing.assert_array_equal(_arrays([Image.open(p) for p in pngs]), want)
    info = json.loads(pngs[1].with_suffix(".json").read_text())
    assert info["image_index"] == 1 and info["category"] == "lamp" and info["seed"] == 0
    assert info["prompt"] == "A photo of lamp, in the background of *" and info["lambda_pg"] is None
    assert info["lambda_cg"] == 1.0 and info["sampler"] == "dpmpp_2m" and info["steps"] == STEPS
    assert info["product"].endswith("product.png") and info["bgjax_version"]

    assert main(_generate_args(model, tmp_path / "bad", "--product", str(f / "product.png"), "--mask",
                               str(f / "mask.png"), "--category", "teapot")) == 2
    assert "the model knows: rice cooker, lamp, coffee mug" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # a failed single product writes nothing
    assert main(_generate_args(model, tmp_path / "bad", "--product", str(f / "nothing.png"), "--category",
                               "lamp")) == 2
    assert f"product: {f / 'nothing.png'}: file not found" in capsys.readouterr().err


def test_cli_manifest_reports_broken_lines_and_resumes(model, photo, tmp_path, capsys):
    f = photo["folder"]
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(f / "small_mask.png")
    (f / "broken.png").write_bytes(b"not an image")
    manifest = f / "manifest.csv"
    manifest.write_text("product,mask,category,reference,reference_mask,seed,num_images\n"
                        "product.png,mask.png,lamp,reference.jpg,reference_mask.png,0,2\n"
                        "product.png,small_mask.png,lamp,,,,\n"
                        "product.png,mask.png,,,,,\n"
                        "cutout.png,,coffee mug,,,5,2\n"
                        "product.png,mask.png,teapot,,,,\n"
                        "broken.png,mask.png,lamp,,,,\n")
    out = tmp_path / "out"
    assert main(_generate_args(model, out, "--manifest", str(manifest))) == 1
    captured = capsys.readouterr()
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3, 4, 6, 7]
    assert "differs from the image's" in errors[0]["reason"] and errors[1]["reason"] == "missing field category"
    assert "unknown category 'teapot'" in errors[2]["reason"] and "unreadable" in errors[3]["reason"]
    assert "manifest.csv:3: mask: size" in captured.err
    assert "generated 4 images for 2 items" in captured.out and "4 inputs with errors" in captured.out
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and all(p.with_suffix(".json").is_file() for p in pngs)
    sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert {(s["line"], s["category"], s["lambda_pg"]) for s in sidecars} == {(2, "lamp", 1.0),
                                                                               (5, "coffee mug", None)}
    times = [p.stat().st_mtime_ns for p in pngs]

    assert main(_generate_args(model, out, "--manifest", str(manifest), "--contact-sheet")) == 1
    assert "generated 0 images for 0 items" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("*_[0-9].png"))] == times
    assert Image.open(out / "contact_sheet.png").size == (3 * 128, 18 + 2 * (128 + 18))  # settings, 2 rows


def test_prompt_negative_prompt_and_latents(pipe, photo):
    import jax

    args = dict(num_images=2, seed=0, steps=STEPS, sampler="euler")
    base = _arrays(pipe(photo["image"], photo["mask"], "lamp", **args))
    # latents= replaces the seeded noise: the seed's own noise, given explicitly, gives the same images
    # (the Euler sampler's initial sigma is not 1, so unscaled latents would not).
    noise = np.stack([np.asarray(jax.random.normal(jax.random.split(jax.random.fold_in(jax.random.key(0), k))[0],
                                                   (16, 16, 4))) for k in range(2)])
    # Noise drawn inside the program and noise passed in compile to differently fused programs: a pixel may round
    # to the next grey level (4 of 13824 on one CPU, none on another); other noise moves every pixel.
    def same(a: np.ndarray, b: np.ndarray) -> None:
        diff = np.abs(a.astype(int) - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())

    same(_arrays(pipe(photo["image"], photo["mask"], "lamp", latents=noise, **args)), base)
    other = _arrays(pipe(photo["image"], photo["mask"], "lamp", latents=noise[::-1], **args))
    same(other[0], base[1])
    assert np.abs(other[0].astype(int) - base[0]).max() > 1
    with pytest.raises(ValueError, match=r"latents: expected NHWC shape \(2, 16, 16, 4\)"):
        pipe(photo["image"], photo["mask"], "lamp", latents=noise[:, :8], **args)

    # The method's template written out as prompt= has the default's tokens and identifier; its product span
    # is the category's own tokens (the template's is the whole "A photo of {category}").
    custom = pipe.prompts.custom("A photo of {category}, in the background of {identifier}", "lamp")
    default = pipe.prompts("lamp")
    assert custom.text == default.text and custom.identifier_index == default.identifier_index >= 0
    np.testing.assert_array_equal(custom.input_ids, default.input_ids)
    words = ~np.isin(custom.input_ids, list(pipe.prompts.special_ids))
    assert custom.fg_tokens[words].sum() == len("lamp") and np.all(custom.fg_tokens <= default.fg_tokens)
    for kwargs in ({"prompt": "a {category} on a beach at night"}, {"negative_prompt": "blurry"}):
        changed = _arrays(pipe(photo["image"], photo["mask"], "lamp", **kwargs, **args))
        assert np.abs(changed.astype(int) - base).max() > 0, kwargs
        np.testing.assert_array_equal(changed[:, photo["mask"]], base[:, photo["mask"]])  # the product untouched
    with pytest.warns(UserWarning, match="not in the prompt"):
        pipe(photo["image"], photo["mask"], "lamp", prompt="a beach at night", **args)


def test_ignored_settings_warn_or_fail(pipe, photo):
    args = dict(num_images=2, seed=0, steps=STEPS)
    with pytest.warns(UserWarning, match="lambda_pg=0.5: ignored, PG runs only with a reference"):
        pipe(photo["image"], photo["mask"], "lamp", lambda_pg=0.5, **args)
    no_pg = pipe.variant(pg=False)
    with pytest.raises(ValueError, match="reference: this model has no PG branch"):
        no_pg(photo["image"], photo["mask"], "lamp", reference=photo["reference"],
              reference_mask=photo["reference_mask"], **args)
    prepared = pipe.variant(cg=False).prepare(photo["image"], photo["mask"], "lamp")
    assert pipe.variant(cg=False).warnings(prepared, lambda_cg=0.3) == [
        "lambda_cg=0.3: ignored, the model has no CG branch"]
    assert pipe.variant(identifiers=False).warnings(prepared) == []  # switched off on purpose (eval's sd)


def test_transformers5_tokenizer_generates_alike(model, pipe, photo, tmp_path):
    from transformers import CLIPTokenizer

    copy = shutil.copytree(model, tmp_path / "model", ignore=shutil.ignore_patterns("tokenizer"))
    CLIPTokenizer.from_pretrained(str(model / "tokenizer")).save_pretrained(copy / "tokenizer")
    assert not (copy / "tokenizer" / "vocab.json").exists()
    args = dict(num_images=2, seed=0, steps=STEPS)
    np.testing.assert_array_equal(
        _arrays(BackgroundPipeline.from_pretrained(copy)(photo["image"], photo["mask"], "lamp", **args)),
        _arrays(pipe(photo["image"], photo["mask"], "lamp", **args)))


def test_every_setting_keys_the_cache(model, pipe, tmp_path):
    import argparse
    import types

    from bgjax.cli import build_parser
    from bgjax.sampling.generate import Item, _Run
    from bgjax.sampling.settings import GenerationSettings, model_fingerprint

    base = ["generate", "--model", str(model), "--out", str(tmp_path), "--product", "p.png", "--category", "lamp"]
    changes = {"sampler": ["--sampler", "euler"], "steps": ["--steps", "7"], "guidance": ["--guidance", "3"],
               "lambda_cg": ["--lambda-cg", "0.5"], "lambda_pg": ["--lambda-pg", "0.5"],
               "style_guidance": ["--style-guidance"], "size": ["--size", "64"], "dtype": ["--dtype", "bfloat16"],
               "prompt": ["--prompt", "a {category}"], "negative_prompt": ["--negative-prompt", "dark"],
               "placement": ["--placement", "0.5", "0.5", "0.5"], "width": ["--width", "64"],
               "height": ["--height", "64"], "image_format": ["--format", "webp"], "quality": ["--quality", "80"],
               "keep_product": ["--keep-product"], "edge_fill": ["--edge-fill"]}

    def settings(argv: list[str], seed: int = 0, fingerprint: str = "m") -> GenerationSettings:
        args: argparse.Namespace = build_parser().parse_args(argv)
        item = Item(None, {"product": "p.png", "category": "lamp"}, tmp_path, seed, 1)
        return _Run.settings(types.SimpleNamespace(args=args, fingerprint=fingerprint, pipe=pipe), item)

    reference = settings(base)
    assert settings(base) == reference and settings(base).key() == reference.key()
    for field, extra in changes.items():
        changed = settings(base + extra)
        assert getattr(changed, field) != getattr(reference, field), field
        assert changed.key() != reference.key(), field
    assert settings(base, seed=1).key() != reference.key()
    assert settings(base, fingerprint="other").key() != reference.key()
    assert set(changes) | {"seed", "model"} == {f.name for f in dataclasses.fields(GenerationSettings)}

    # The fingerprint reads contents: the same size and modification time with other bytes is another model.
    copy = shutil.copytree(model, tmp_path / "model")
    params = copy / "unet" / "params.safetensors"
    stat = params.stat()
    data = bytearray(params.read_bytes())
    data[-1] ^= 1
    params.write_bytes(bytes(data))
    os.utime(params, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_fingerprint(copy) != model_fingerprint(model)


def test_cli_rerun_writes_nothing_and_a_change_regenerates(model, photo, tmp_path, capsys):
    f = photo["folder"]
    argv = _generate_args(model, tmp_path, "--product", str(f / "product.png"), "--mask", str(f / "mask.png"),
                          "--category", "lamp")
    assert main([*argv, "--contact-sheet"]) == 0
    first = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert main(argv) == 0
    assert "generated 0 images for 0 items" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == first  # the sheet still shows these images
    assert main([*argv, "--guidance", "2.0"]) == 0
    assert not (tmp_path / "contact_sheet.png").exists()  # it showed the other settings' images: not left stale
    first.pop(tmp_path / "contact_sheet.png")
    new = sorted(set(tmp_path.glob("*.png")) - set(first))
    assert len(new) == 2
    info = json.loads(new[0].with_suffix(".json").read_text())
    assert info["settings"]["guidance"] == 2.0 and info["warnings"] == []
    old = sorted(p for p in first if p.suffix == ".png")
    assert not np.array_equal(np.asarray(Image.open(new[0])), np.asarray(Image.open(old[0])))
    # An ignored setting is printed and recorded.
    assert main([*argv, "--lambda-pg", "0.5"]) == 0
    assert "lambda_pg=0.5: ignored" in capsys.readouterr().err
    newest = max(tmp_path.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert json.loads(newest.read_text())["warnings"] == [
        "lambda_pg=0.5: ignored, PG runs only with a reference and none was given"]


def test_shards_together_make_the_one_machine_outputs(model, photo, tmp_path, monkeypatch):
    f = photo["folder"]
    manifest = tmp_path / "manifest.jsonl"
    lines = [{"product": str(f / "product.png"), "mask": str(f / "mask.png"), "category": "lamp", "seed": s}
             for s in range(4)] + [{"product": str(f / "cutout.png"), "category": "coffee mug"}, {"category": "lamp"}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    one = tmp_path / "one"
    assert main(_generate_args(model, one, "--manifest", str(manifest), "--num-images", "1")) == 1
    sharded = tmp_path / "sharded"
    for index in ("1", "0"):  # the Slurm array's variables, as a job array task sees them
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", index)
        assert main(_generate_args(model, sharded, "--manifest", str(manifest), "--num-images", "1")) in (0, 1)
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 5 and names == sorted(p.name for p in sharded.glob("*.png"))
    for name in names:
        np.testing.assert_array_equal(np.asarray(Image.open(sharded / name)), np.asarray(Image.open(one / name)))
    assert (sharded / "index.jsonl").read_text() == (one / "index.jsonl").read_text()
    errors = [json.loads(x) for p in sorted(sharded.glob("errors-*.jsonl")) for x in p.read_text().splitlines()]
    assert [e["line"] for e in errors] == [6] == [json.loads(x)["line"] for x in
                                                  (one / "errors.jsonl").read_text().splitlines()]
    assert main(_generate_args(model, sharded, "--manifest", str(manifest), "--num-shards", "2",
                               "--shard-index", "2")) == 2


def test_width_and_height_for_photos_and_cutouts_one_compile_per_shape(pipe, photo):
    """A 48 x 48 photo fitted into a 64 x 32 canvas (32 x 32, centred: the rest is generated) and a cut-out placed
    on it; the second product at the same shape compiles nothing."""
    from bgjax.sampling.host import place_photo

    before = traces()
    wide = _arrays(pipe(photo["image"], photo["mask"], "lamp", num_images=2, steps=STEPS, width=64, height=32))
    assert wide.shape == (2, 32, 64, 3) and traces() == before + 1
    placed, placed_mask, inside = place_photo(photo["image"], photo["mask"].astype(np.uint8) * 255, (64, 32))
    assert inside[:, 16:48].all() and not inside[:, :16].any() and not inside[:, 48:].any()
    product = placed_mask >= 128
    np.testing.assert_array_equal(wide[:, product], np.broadcast_to(placed[product], (2, product.sum(), 3)))
    assert (wide[:, :, :16] != 255).any(axis=-1).mean() > 0.9  # outside the photo: generated, not the canvas
    cutout = _arrays(pipe(photo["cutout"], category="coffee mug", num_images=2, steps=STEPS, width=64, height=32,
                          placement=(10 / 32, 0.5, 0.5)))
    assert cutout.shape == (2, 32, 64, 3) and traces() == before + 1  # same shape: the same program
    np.testing.assert_array_equal(cutout[:, 11:21, 27:37], np.broadcast_to(photo["cutout"][5:15, 5:15, :3],
                                                                            (2, 10, 10, 3)))
    tall = pipe.prepare(photo["image"], photo["mask"], "lamp", height=64)  # the other side: the model's 32
    assert tall.source.shape == (64, 32, 3) and tall.mask.shape == (64, 32)
    with pytest.raises(ValueError, match="width: must be a positive multiple of 4"):
        pipe.prepare(photo["image"], photo["mask"], "lamp", width=30, height=32)
    with pytest.raises(ValueError, match="either size .* or width / height"):
        pipe.prepare(photo["image"], photo["mask"], "lamp", size=32, width=32)
    with pytest.raises(ValueError, match="feather: applies to a photo's mask"):
        pipe.prepare(photo["cutout"], category="lamp", feather=3)


def test_cli_formats_quality_and_canvas(model, photo, tmp_path, capsys):
    f = photo["folder"]
    argv = _generate_args(model, tmp_path, "--product", str(f / "product.png"), "--mask", str(f / "mask.png"),
                          "--category", "lamp", "--width", "64", "--height", "32")
    for extra in (["--format", "webp", "--quality", "90"], ["--format", "jpeg", "--quality", "90"],
                  ["--format", "jpeg", "--quality", "20"]):
        assert main([*argv, *extra]) == 0
    webp, jpegs = sorted(tmp_path.glob("*.webp")), sorted(tmp_path.glob("*.jpg"))
    assert len(webp) == 2 and len(jpegs) == 4 and not list(tmp_path.glob("*.png"))  # quality keys the files too
    for file, name in ((webp[0], "WEBP"), (jpegs[0], "JPEG")):
        with Image.open(file) as image:
            assert image.format == name and image.size == (64, 32)
        info = json.loads(file.with_suffix(".json").read_text())
        assert info["format"] == name.lower() and info["settings"]["width"] == 64 and info["size"] == [64, 32]
    sizes = {json.loads(p.with_suffix(".json").read_text())["quality"]: p.stat().st_size for p in jpegs}
    assert sizes[20] < sizes[90]
    capsys.readouterr()
    assert main([*argv, "--quality", "0", "--format", "jpeg"]) == 2
    assert "quality: expected an int from 1 to 100, got 0" in capsys.readouterr().err
    assert main([*argv, "--size", "32"]) == 2
    assert "give either --size" in capsys.readouterr().err
