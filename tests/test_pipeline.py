"""The grain pipeline: shapes, determinism, exact resume, per-process sharding, worker processes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bgjax.data.augment import CropConfig, PGAugmentConfig
from bgjax.data.convert import read_manifest, write_dataset
from bgjax.data.pg_render import pg_condition, pg_render
from bgjax.data.pipeline import PGPerturb, PipelineConfig, make_dataset, prompt_tables
from bgjax.data.sources import list_folder
from bgjax.method.config import MethodConfig
from bgjax.method.prompts import PromptBuilder
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from bgjax.models.text_encoder import load_tokenizer

CATEGORIES = ("rice cooker", "lamp", "coffee mug")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = ["image,category"]
    for i in range(24):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        rgba = np.dstack([rng.integers(0, 255, (h, w, 3), dtype=np.uint8), np.zeros((h, w), np.uint8)])
        top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        rgba[top:top + h // 3, left:left + w // 3, 3] = 255
        Image.fromarray(rgba, "RGBA").save(root / "img" / f"p{i:02d}.png")
        rows.append(f"p{i:02d}.png,{CATEGORIES[i % 3]}")
    (root / "cats.csv").write_text("\n".join(rows) + "\n")
    listing = list_folder(root / "img", root / "cats.csv")
    for fmt in ("arrayrecord", "tfrecord"):
        write_dataset(listing, root / fmt, fmt, records_per_shard=5, workers=1)
    builder = PromptBuilder(load_tokenizer(write_byte_tokenizer(root / "tok")), MethodConfig())
    return root, prompt_tables(builder, read_manifest(root / "arrayrecord")["categories"])


def _config(**kw):
    return PipelineConfig(batch_size=4, seed=3, crop=CropConfig(resolution=32), pg=PGAugmentConfig(), **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("fmt", ["arrayrecord", "tfrecord"])
def test_batches_have_the_documented_shapes(catalogue, fmt):
    root, prompts = catalogue
    batch = next(iter(make_dataset(root / fmt, _config(), prompts)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (4, 32, 32) and set(np.unique(batch["mask"])) <= {0, 1}
    assert (batch["mask"].reshape(4, -1).sum(1) > 0).all()  # the product stays in frame
    assert batch["input_ids"].shape == (4, 77) and batch["fg_tokens"].shape == (4, 77)
    cfg = PGAugmentConfig()
    holes, mixes = cfg.rect_count[1] + cfg.blob_count[1], cfg.mix_count[1]
    assert {k: (v.shape, v.dtype) for k, v in batch.items() if k.startswith("pg_")} == {
        "pg_dilation": ((4,), np.int32), "pg_shift": ((4, 2), np.int32),
        "pg_hole_spans": ((4, holes, 32, 2), np.int32), "pg_mix_spans": ((4, mixes, 32, 2), np.int32),
        "pg_partner_image": ((4, 32, 32, 3), np.uint8)}
    c_pg, perturbed = (np.asarray(a) for a in pg_render(batch))
    assert c_pg.shape == (4, 32, 32, 3) and c_pg.dtype == np.float32
    assert np.abs(c_pg).max() <= 1.0 and (c_pg[perturbed] == 0).all()
    cids = batch["category_id"]
    np.testing.assert_array_equal(batch["input_ids"], prompts["input_ids"][cids])


def test_same_seed_same_batches_and_exact_resume(catalogue):
    root, prompts = catalogue
    ds = make_dataset(root / "arrayrecord", _config(), prompts)
    reference = _take(iter(ds), 8)
    it = iter(ds)
    _take(it, 3)
    state = it.get_state()
    resumed = iter(make_dataset(root / "arrayrecord", _config(), prompts))
    resumed.set_state(state)
    for want, got in zip(reference[3:], _take(resumed, 5), strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    other_seed = next(iter(make_dataset(root / "arrayrecord", PipelineConfig(
        batch_size=4, seed=4, crop=CropConfig(resolution=32)), prompts)))
    assert not np.array_equal(other_seed["image"], reference[0]["image"])


def test_processes_read_disjoint_shards_of_each_epoch(catalogue):
    root, prompts = catalogue
    cfg = PipelineConfig(batch_size=1, seed=1, num_epochs=1, crop=CropConfig(resolution=16, flip_probability=0))
    seen = []
    for index in range(2):
        batches = list(make_dataset(root / "arrayrecord", cfg, prompts, process_index=index, process_count=2))
        seen.append({b["image"].tobytes() for b in batches})
        assert len(batches) == 12
    assert not seen[0] & seen[1]


def test_worker_processes_give_the_same_batches(catalogue):
    root, prompts = catalogue
    serial = _take(iter(make_dataset(root / "arrayrecord", _config(), prompts)), 3)
    parallel = _take(iter(make_dataset(root / "arrayrecord", _config(workers=2), prompts)), 3)
    for a, b in zip(serial, parallel, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_latent_cache_holds_the_vae_posterior_of_its_crops(catalogue, tiny_diffusers_dir, tmp_path):
    import jax.numpy as jnp

    from bgjax import model_dir
    from bgjax.convert.diffusers_folder import import_diffusers
    from bgjax.data.augment import to_float
    from bgjax.data.example import decode_example
    from bgjax.data.images import decode_rgb
    from bgjax.data.latents import cache_latents, decode_latents
    from bgjax.data.records import read_records

    root, prompts = catalogue
    import_diffusers(tiny_diffusers_dir, tmp_path / "model")
    m = cache_latents(root / "arrayrecord", tmp_path / "model", tmp_path / "cache", resolution=32, batch_size=4)
    assert m["num_written"] == sum(s["num_records"] for s in m["shards"]) == 24
    vae, params = model_dir.load_component(tmp_path / "model", "vae")
    ex = decode_example(next(read_records(tmp_path / "cache" / m["shards"][0]["path"])))
    image = decode_rgb(ex["image"][0])
    mean, logvar = vae.apply({"params": params}, jnp.asarray(to_float(image))[None], method=vae.encode)
    cached = decode_latents(ex)
    np.testing.assert_allclose(cached["latent_mean"], np.asarray(mean[0]), rtol=2e-3, atol=2e-3)  # fp16 storage
    np.testing.assert_allclose(cached["latent_logvar"], np.asarray(logvar[0]), rtol=2e-3, atol=2e-3)
    batch = next(iter(make_dataset(tmp_path / "cache", _config(), prompts)))
    assert batch["latent_mean"].shape == (4, 16, 16, 4) and batch["image"].shape == (4, 32, 32, 3)


def test_pg_condition_rebuilds_the_augmentation_exactly():
    """The loader's parameters rendered in JAX == the numpy reference drawn from the same generator."""
    import jax

    from bgjax.data.augment import pg_augment

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    masks = np.zeros((3, 40, 40), np.uint8)
    masks[:, 10:25, 12:30] = 1
    cfg = PGAugmentConfig(max_shift=0.2, mix_probability=1.0)
    draw = np.random.default_rng(5)
    examples = [PGPerturb(cfg).random_map({"image": images[i], "mask": masks[i]}, draw) for i in range(3)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["pg_partner_image"] = images[[1, 2, 0]]
    c_pg = np.asarray(jax.jit(pg_condition)(batch))
    replay = np.random.default_rng(5)
    for i in range(3):
        want, _ = pg_augment(images[i], masks[i], images[(i + 1) % 3], replay, cfg)
        np.testing.assert_array_equal(c_pg[i], want)


def test_pg_partner_is_drawn_per_example_whatever_the_layout(catalogue):
    """An example's PG partner image and parameters depend on its stream position only: batches of 4
    on one process and of 2 on each of two processes give the same per example (a partner taken
    from the batch, like the next image, would change with the layout)."""
    root, prompts = catalogue
    cfg = PGAugmentConfig(mix_probability=1.0)

    def batches(size, index=0, count=1):
        config = PipelineConfig(batch_size=size, seed=3, crop=CropConfig(resolution=32), pg=cfg)
        return _take(iter(make_dataset(root / "arrayrecord", config, prompts, index, count)), 8 // size // count)

    def by_example(bs):
        return {int(s): {k: b[k][j] for k in ("image", "pg_partner_image", "pg_mix_spans")}
                for b in bs for j, s in enumerate(b["example_seed"])}

    one, two = by_example(batches(4)), by_example(batches(2, 0, 2) + batches(2, 1, 2))
    assert sorted(one) == sorted(two) == list(range(8))
    for seed, want in one.items():
        for key, value in want.items():
            np.testing.assert_array_equal(two[seed][key], value, err_msg=f"{key} of example {seed}")
    assert sum(not np.array_equal(e["pg_partner_image"], e["image"]) for e in one.values()) >= 6  # another record


@pytest.mark.parametrize("fmt", ["arrayrecord", "tfrecord"])
def test_pg_prompt_swap_names_another_category(catalogue, fmt):
    """With prompt_swap_probability 1 every example's prompt arrays are another category's row of the tables
    (never its own, and both others drawn); at 0.5 some are swapped and some kept; the same per example
    on a rerun; and the image, mask and PG parameters are those of the run without a swap."""
    root, prompts = catalogue

    def run(p):
        config = PipelineConfig(batch_size=4, seed=3, crop=CropConfig(resolution=32),
                                pg=PGAugmentConfig(prompt_swap_probability=p))
        return _take(iter(make_dataset(root / fmt, config, prompts)), 6)

    def rows(batches):  # the category row each example's prompt arrays come from
        out = []
        for b in batches:
            for j, cid in enumerate(b["category_id"]):
                match = [c for c in range(len(CATEGORIES))
                         if all(np.array_equal(b[k][j], prompts[k][c]) for k in prompts)]
                assert len(match) == 1, (j, match)
                out.append((int(cid), match[0]))
        return out

    kept, swapped, half = run(0.0), run(1.0), run(0.5)
    assert all(own == row for own, row in rows(kept))
    pairs = rows(swapped)
    assert all(own != row for own, row in pairs)
    assert {row for own, row in pairs if own == 0} == {1, 2}  # uniform over the others, not always the next
    mixed = rows(half)
    assert 0 < sum(own != row for own, row in mixed) < len(mixed)
    assert rows(run(1.0)) == pairs
    for a, b in zip(kept, swapped, strict=True):
        for key in ("image", "mask", "pg_dilation", "pg_hole_spans", "pg_mix_spans"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(ValueError, match="prompt_swap_probability.*two categories"):
        make_dataset(root / fmt, PipelineConfig(batch_size=4, pg=PGAugmentConfig(prompt_swap_probability=0.5)),
                     {k: v[:1] for k, v in prompts.items()})
