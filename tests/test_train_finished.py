"""One finished 12-step CG run with the paper's EMA (0.9999): what it exported, and what a rerun in
its workdir does with a changed config or data (refused naming the field, or accepted and logged),
that it returns at once, and that a resume builds the trained params from shapes."""

from __future__ import annotations

import json
import logging
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from bgjax.cli import main
from bgjax.models.configs import ConfigError
from bgjax.train import loop
from bgjax.train.config_file import load_config
from tests.test_train import CONFIG, SMALL, data_dir  # noqa: F401  (the module-scope data fixture)

RUN = ["--config.num_steps=12", "--config.checkpoint_every=12", "--config.log_every=12",
       "--config.optim.ema_decay=0.9999"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):  # noqa: F811
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--config", str(CONFIG), "--workdir", str(run), f"--config.data.dir={data_dir}", *SMALL,
                 *RUN]) == 0
    return run


def _config(data_dir, *extra):  # noqa: F811
    return load_config(CONFIG, [f"--config.data.dir={data_dir}", *SMALL, *RUN, *extra])


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: np.asarray(tree)}


def test_exported_ema_follows_the_training(finished):
    """The exported CG is the EMA (not the raw params) and close to the raw params, not to the
    initial weights: the zero-initialised output convs (controlnet_*) keep under half of their
    distance from zero. Without the warm-up they would keep 99.9% (0.9999 ** 12 of the init)."""
    with ocp.CheckpointManager(finished / "checkpoints", item_names=("state",)) as manager:
        state = manager.restore(12, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    exported = load_file(finished / "model" / "cg" / "params.safetensors")
    raw, ema = _flat(state["params"]["cg"]), _flat(state["ema"]["cg"])
    assert set(exported) == set(raw)
    assert all(np.array_equal(exported[k], ema[k]) for k in raw)  # the EMA was exported
    outputs = [k for k in raw if k.startswith("controlnet_")]
    assert outputs and all(np.linalg.norm(raw[k]) > 0 for k in outputs)
    left = {k: float(np.linalg.norm(ema[k] - raw[k]) / np.linalg.norm(raw[k])) for k in outputs}
    print(f"|ema - raw| / |raw - init| over {len(left)} output convs: max {max(left.values()):.3f}")
    assert max(left.values()) < 0.5, left
    assert not all(np.array_equal(ema[k], raw[k]) for k in raw)  # an average, not a copy


def test_a_finished_run_returns_at_once(finished, data_dir, monkeypatch, caplog):  # noqa: F811
    """Harmless changes (logging, sampling, workers, a moved copy of the data) are accepted and
    logged; the run is finished, so nothing is built."""
    moved = finished.parent / "moved_data"
    shutil.copytree(data_dir, moved)
    monkeypatch.setattr(loop, "load_stage", lambda *a, **k: pytest.fail("built models for a finished run"))
    caplog.set_level(logging.INFO, logger="bgjax")
    config = load_config(CONFIG, [f"--config.data.dir={moved}", *SMALL, *RUN, "--config.log_every=3",
                                  "--config.sample_steps=5", "--config.data.workers=2"])
    assert loop.train(config, finished) == {"step": 12, "start": 12, "compile_seconds": 0.0, "stopped": None}
    for field in ("log_every", "sample_steps", "data.workers", "data.dir"):
        assert f"resume: {field} changed" in caplog.text, field
    assert "already trained to step 12" in caplog.text


@pytest.mark.parametrize("override, field", [
    ("--config.data.batch_size=4", "data.batch_size"), ("--config.seed=1", "seed"),
    ("--config.data.crop.resolution=48", "data.crop.resolution"), ("--config.optim.learning_rate=3e-4", "optim.lr"),
    ("--config.stage='unet'", "stage"), ("--config.dtype='bfloat16'", "dtype"),
    ("--config.data.crop.flip_probability=0.0", "data.crop.flip_probability"),
])
def test_a_resume_that_would_change_the_run_is_refused(finished, data_dir, override, field):  # noqa: F811
    field = field.replace("optim.lr", "optim.learning_rate")
    with pytest.raises(ConfigError, match=rf"checkpoint 12 .*{field}: .*resume_force=True"):
        loop.train(_config(data_dir, override), finished)


def test_other_data_is_refused_and_force_resumes(finished, data_dir, caplog):  # noqa: F811
    other = finished.parent / "other_data"
    assert main(["data", "synthetic", "--out", str(other), "--num", "40", "--size", "48", "--workers", "1"]) == 0
    with pytest.raises(ConfigError, match=r"data: the records in .*other_data are not those checkpoint 12"):
        loop.train(_config(other), finished)
    caplog.set_level(logging.INFO, logger="bgjax")
    assert loop.train(_config(other, "--config.resume_force=True", "--config.seed=3"), finished)["step"] == 12
    assert "seed: 0 -> 3 (breaks exact resume; accepted because resume_force is set)" in caplog.text


def test_a_resume_builds_the_trained_params_from_shapes(finished, data_dir, monkeypatch):  # noqa: F811
    """Continuing (num_steps 12 -> 13): the stage's trained params are ShapeDtypeStructs, never
    initialised (the checkpoint holds them); the frozen ones are arrays."""
    real, seen = loop.load_stage, {}

    class Built(Exception):
        pass

    def spy(*args, **kwargs):
        models, trained, frozen = real(*args, **kwargs)
        seen.update(trained=jax.tree.leaves(trained), frozen=jax.tree.leaves(frozen))
        raise Built

    monkeypatch.setattr(loop, "load_stage", spy)
    with pytest.raises(Built):
        loop.train(_config(data_dir, "--config.num_steps=13"), finished)
    assert seen["trained"] and all(isinstance(x, jax.ShapeDtypeStruct) for x in seen["trained"])
    assert all(isinstance(x, jax.Array) for x in seen["frozen"])


def test_a_latent_cache_at_another_resolution_is_refused(tmp_path, data_dir):  # noqa: F811
    """manifest.json as bgjax.data.latents.cache_latents writes it (a "latents" entry with the
    resolution it cropped to), at 64 px, for a run at 32."""
    cache = tmp_path / "cache"
    shutil.copytree(data_dir, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["latents"] = {"resolution": 64, "seed": 0, "vae": str(tmp_path / "model"), "scaling_factor": 1.0,
                           "shift_factor": None}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"data.crop.resolution: 32, but the latent cache .* built at 64 px"):
        loop.train(_config(cache), tmp_path / "run")
