"""Stage 1 -> stage 2 -> stage 1 again: one MethodConfig from training to serving, exported models
that keep their base's components, with relative links (copies out of the installed package) and
provenance. Tiny models built from `config.init` (configs/tiny_synthetic.py), no training steps:
what is checked is how the stages are assembled and exported."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bgjax
from bgjax import model_dir
from bgjax.method.denoiser import load_denoiser
from bgjax.method.store import load_method
from bgjax.models.configs import ConfigError
from bgjax.models.region import Region
from bgjax.train.config_file import load_config
from bgjax.train.models import load_stage, save_model

CONFIG = Path(__file__).parent.parent / "bgjax" / "configs" / "tiny_synthetic.py"
CATEGORIES = {"coffee mug": 0, "desk lamp": 1}


def _stage(root: Path, name: str, *overrides: str, categories: dict = CATEGORIES, perturb: str | None = None):
    """load_stage for `overrides`, then its export to root/name/model as the trainer writes it;
    `perturb` adds noise to that component so its output is not the zero of a fresh branch."""
    config = load_config(CONFIG, ["--config.dtype='float32'", *overrides])
    models, trained, frozen = load_stage(config, categories, jnp.float32, root / name)
    params = {**frozen, **trained}
    if perturb:
        leaves, tree = jax.tree.flatten(params[perturb])
        keys = jax.random.split(jax.random.key(1), len(leaves))
        params[perturb] = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                                    for x, k in zip(leaves, keys, strict=True)])
    save_model(models, config, jax.device_get(params), root / name / "model", f"test {name}")
    return models, params, root / name / "model"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A stage-1 (CG) model whose UNet runs mask-guided cross-attention."""
    root = tmp_path_factory.mktemp("stages")
    return _stage(root, "cg", "--config.method.mask_guided_unet=True", perturb="cg")[2]


@pytest.fixture(scope="module")
def stage2(stage1):
    """Stage 2 (PG) over it, with an override of PG's own field."""
    return _stage(stage1.parent.parent, "pg", "--config.stage='pg'", f"--config.model={stage1}",
                  "--config.method.pg_mask_residuals=True", "--config.method.lambda_pg=0.5", perturb="pg")


@pytest.mark.parametrize("override", ["mask_guided_unet=False", "joiner='; '", "identifiers='shared'",
                                      "special_tokens_in_both_spans=False", "lambda_cg=0.5",
                                      "background_template='behind {identifier}'"])
def test_stage2_refuses_changing_how_stage1_computes(stage1, tmp_path, override):
    config = load_config(CONFIG, ["--config.stage='pg'", f"--config.model={stage1}", f"--config.method.{override}"])
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"config\.method\.{field}: .* {stage1 / 'method.json'}"):
        load_stage(config, CATEGORIES, jnp.float32, tmp_path)


def test_stage2_trains_and_serves_one_method(stage2):
    """PG is trained against stage 1's mask-guided UNet, with the PG override; the saved method.json
    carries both, and `load_denoiser` rebuilds the very function the trainer used."""
    models, params, out = stage2
    assert models.method.mask_guided_unet and models.method.pg_mask_residuals and models.method.lambda_pg == 0.5
    assert models.denoiser.unet.region_mode == "mask_guided" and models.denoiser.pg.mask_residuals
    saved, categories, _ = load_method(out)
    assert saved == models.method and categories == sorted(CATEGORIES, key=CATEGORIES.get)

    served, served_params, method = load_denoiser(out)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 77, 64)), jnp.float32)
    cond = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    mask = np.zeros((2, 32, 32), np.float32)
    mask[:, 8:24, 8:24] = 1
    spans = np.zeros((2, 77), np.float32)
    region = Region(jnp.asarray(mask), jnp.asarray(spans).at[:, :5].set(1), jnp.asarray(spans).at[:, 5:].set(1))
    t = jnp.asarray([10, 500])

    def run(denoiser, p, lambda_pg):
        return np.asarray(denoiser(p, z, t, context, region, cond, cond, method.lambda_cg, lambda_pg))

    trained = run(models.denoiser, params, models.method.lambda_pg)
    np.testing.assert_allclose(run(served, served_params, method.lambda_pg), trained, rtol=1e-5, atol=1e-6)
    # what the test can tell apart: PG without residual masking, or the plain UNet, compute otherwise
    plain_pg = dataclasses.replace(served, pg=served.pg.clone(mask_residuals=False))
    plain_unet = dataclasses.replace(served, unet=served.unet.clone(region_mode="none"))
    for other in (plain_pg, plain_unet):
        assert np.abs(run(other, served_params, method.lambda_pg) - trained).max() > 1e-3


def _is_relative_link(path: Path) -> bool:
    return path.is_symlink() and not os.path.isabs(os.readlink(path))


def test_cg_stage_over_a_model_with_pg_keeps_pg_and_records_provenance(stage2, tmp_path):
    """Retraining CG over the stage-2 model: PG is kept (linked, relatively), CG written anew, and
    bgjax.json says PG was trained against the previous CG's run, the new CG against the kept UNet."""
    _, _, pg_model = stage2
    root = tmp_path / "runs"
    shutil.copytree(pg_model.parent.parent, root / "before", symlinks=True)  # the cg and pg runs, links kept
    base = root / "before" / "pg" / "model"
    _, _, out = _stage(root, "cg_again", f"--config.model={base}")
    assert sorted(model_dir.components(out)) == ["cg", "pg", "text_encoder", "unet", "vae"]
    for kind in ("pg", "unet", "vae", "text_encoder"):
        assert _is_relative_link(out / kind), kind
    assert not (out / "cg").is_symlink() and (out / "identifiers.safetensors").is_file()

    prov, before = model_dir.provenance(out), model_dir.provenance(base)
    assert prov["pg"] == before["pg"] and prov["unet"] == before["unet"]
    assert prov["cg"]["run"] != before["cg"]["run"] and "cg_again" in prov["cg"]["run"]
    assert prov["cg"]["against"] == {k: before[k]["run"] for k in ("text_encoder", "unet", "vae")}
    assert prov["pg"]["against"]["cg"] == before["cg"]["run"]  # PG met the old CG, and bgjax.json says so
    assert prov["identifiers"]["run"] == prov["cg"]["run"]

    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)  # the runs move together: the relative links still resolve
    denoiser, params, _ = load_denoiser(moved / "cg_again" / "model")
    assert denoiser.pg is not None and denoiser.cg is not None


def test_a_base_inside_the_package_is_copied(tmp_path):
    """A stage over the bundled model copies what it keeps: a link into site-packages would break
    on the next reinstall."""
    bundled = Path(bgjax.__file__).parent / "assets" / "tiny_model"
    categories = {c: i for i, c in enumerate(json.loads((bundled / "method.json").read_text())["categories"])}
    _, _, out = _stage(tmp_path, "cg", f"--config.model={bundled}", categories=categories)
    for kind in ("pg", "unet", "vae", "text_encoder"):
        assert (out / kind).is_dir() and not (out / kind).is_symlink(), kind
        assert (out / kind / "params.safetensors").read_bytes() == (bundled / kind / "params.safetensors").read_bytes()


@pytest.mark.parametrize("shapes_only", [False, True])
def test_new_branches_train_float32_masters_under_bf16_compute(stage1, tmp_path, shapes_only):
    """A new CG or PG starts as a copy of the frozen UNet's encoder, which is held in the compute dtype;
    the copy must come back as float32 (bf16 masters round small updates away, and the AOT-compiled step
    rejected its own float32 EMA at step 2)."""
    for stage, base in (("cg", []), ("pg", [f"--config.model={stage1}"])):
        config = load_config(CONFIG, ["--config.dtype='bfloat16'", f"--config.stage='{stage}'", *base])
        _, trained, frozen = load_stage(config, CATEGORIES, jnp.bfloat16, tmp_path / stage, shapes_only=shapes_only)
        assert {x.dtype for x in jax.tree.leaves(trained)} == {jnp.dtype(jnp.float32)}, stage
        assert {x.dtype for x in jax.tree.leaves(frozen["unet"])} == {jnp.dtype(jnp.bfloat16)}, stage
