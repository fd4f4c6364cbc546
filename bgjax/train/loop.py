"""`bgjax train`: the training loop, top to bottom.

    mesh -> data -> models -> state (fresh or restored) -> compiled step -> loop:
        step, log, checkpoint, stop on SIGTERM or a non-finite loss -> model directory
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from bgjax.data.augment import CropConfig, PGAugmentConfig
from bgjax.data.convert import read_manifest, write_dataset
from bgjax.data.pipeline import PipelineConfig, make_dataset
from bgjax.data.sources import list_synthetic
from bgjax.models.configs import ConfigError
from bgjax.train import TrainingDiverged, sharding
from bgjax.train.checkpoint import Checkpoints, abstract
from bgjax.train.models import load_stage, save_model
from bgjax.train.samples import sample_grid, validation_set
from bgjax.train.step import init_state, jit_train_step, make_optimizer

_log = logging.getLogger("bgjax.train")

# Dense bf16 peak per device, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0}


class Preemption:
    """SIGTERM sets a flag; the loop saves and stops at the next step (all processes agree)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def __call__(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def prepare_data(config, workdir: Path) -> Path:
    if config.data.dir:
        return Path(config.data.dir)
    if config.data.synthetic_num <= 0:
        raise ConfigError("config.data.dir: no records given (or set data.synthetic_num to generate some)")
    out = workdir / "data"
    if jax.process_index() == 0 and not (out / "manifest.json").is_file():
        write_dataset(list_synthetic(config.data.synthetic_num, config.seed, config.data.synthetic_size), out,
                      workers=1)
    multihost_utils.sync_global_devices("bgjax synthetic data")
    return out


def data_iterator(config, data_dir: Path, prompt_tables: dict):
    processes = jax.process_count()
    if config.data.batch_size % processes:
        raise ConfigError(f"data.batch_size: {config.data.batch_size} is not divisible by {processes} processes")
    pipeline = PipelineConfig(batch_size=config.data.batch_size // processes, seed=config.seed,
                              workers=config.data.workers, crop=CropConfig(**config.data.crop),
                              pg=PGAugmentConfig(**config.data.pg) if config.stage == "pg" else None)
    return iter(make_dataset(data_dir, pipeline, prompt_tables, jax.process_index(), processes))


def peak_tflops(config) -> float:
    if config.peak_tflops:
        return config.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in kind), 0.0)


def _host(tree):
    """Every process gets the whole arrays (sharded ones are gathered)."""
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def train(config, workdir: Path) -> dict:
    """Train `config.stage` in `workdir`, resuming from its latest checkpoint; returns a summary."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    leader = jax.process_index() == 0
    if leader:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
    dtype = jnp.dtype(config.dtype)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)

    data_dir = prepare_data(config, workdir)
    categories = read_manifest(data_dir)["categories"]
    models, trained, frozen = load_stage(config, categories, dtype, workdir)
    tables = models.prompt_tables(categories) if models.prompts else {}
    empty = {k: v[0] for k, v in models.prompts.batch([""], empty=True).items()} if models.prompts else None
    batches = data_iterator(config, data_dir, tables)

    trainer = Trainer(config, models, trained, frozen, empty, mesh)
    frozen = trainer.place(frozen)
    checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
    start = checkpoints.latest_step()
    if start is None:
        state, start = trainer.fresh_state(trained), 0
    else:
        state = checkpoints.restore(start, trainer.abstract_state, batches)
        _log.info("resumed from step %d", start)
    del trained

    batch = sharding.global_batch(next(batches), mesh) if start < config.num_steps else None
    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, frozen, batch).compile() if batch is not None else None
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis() if compiled is not None else None
    flops = float((cost[0] if isinstance(cost, list) else cost or {}).get("flops", 0.0))
    _log.info("train step compiled in %.1f s (%.3g TFLOP per device per step)", compile_s, flops / 1e12)

    writer = _summary_writer(workdir) if leader else None
    validation = validation_set(data_dir, config.num_samples) if config.sample_every and leader else []
    preemption = Preemption()
    peak = peak_tflops(config)
    step, last_time, last_step, stopped = start, time.perf_counter(), start, None
    bar = tqdm(total=config.num_steps, initial=start, desc=f"train {config.stage}", disable=not leader)
    try:
        while step < config.num_steps:
            state, metrics = compiled(state, frozen, batch)
            step += 1
            if step % config.log_every == 0 or step == config.num_steps:
                _check_finite(state, checkpoints)
                now = time.perf_counter()
                rate = (step - last_step) / (now - last_time)
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values.update(images_per_second=rate * config.data.batch_size, tflops_per_device=rate * flops / 1e12)
                if peak:
                    values["mfu"] = values["tflops_per_device"] / peak
                last_time, last_step = now, step
                _log_metrics(workdir, writer, step, values, leader)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_second']:.1f}")
            preempted = preemption()
            if step % config.checkpoint_every == 0 or step == config.num_steps or preempted:
                _check_finite(state, checkpoints)
                checkpoints.save(step, state, batches, config.to_dict())
            if config.sample_every and step % config.sample_every == 0 and config.stage != "vae":
                _write_samples(models, {**frozen, **state.params}, validation, config, workdir, writer, step)
            bar.update(1)
            if preempted:
                stopped = "preempted"
                break
            if step < config.num_steps:  # fetched after a save, so the saved iterator is at `step`
                batch = sharding.global_batch(next(batches), mesh)
    finally:
        checkpoints.wait()
        checkpoints.close()
        preemption.close()
        bar.close()
        if writer is not None:
            writer.close()
    if stopped is None:
        params = state.ema if state.ema is not None else state.params
        exported = _host({**{k: v for k, v in frozen.items() if k not in params}, **params})
        if config.stage == "vae":
            models.configs["vae"]["scaling_factor"] = latent_scale(models, exported["vae"], batches)
        if leader:
            save_model(models, config, exported, workdir / "model", f"bgjax train ({config.stage}, step {step})")
        multihost_utils.sync_global_devices("bgjax model saved")
    return {"step": step, "start": start, "compile_seconds": compile_s, "stopped": stopped}


class Trainer:
    """The stage's optimizer, where the state and the frozen params live on `mesh`, and the jitted
    step. Built from arrays or ShapeDtypeStructs, so a step can be compiled without any weights."""

    def __init__(self, config, models, trained: dict, frozen: dict, empty_prompt: dict | None, mesh):
        rules = tuple(tuple(r) for r in config.mesh.rules)
        self.config, self.mesh = config, mesh
        self.tx = make_optimizer(config)
        state_shapes = jax.eval_shape(self._init, trained)
        self.state_shardings = sharding.tree_shardings(state_shapes, mesh, rules)
        self.abstract_state = abstract(state_shapes, self.state_shardings)
        self.frozen_shardings = sharding.tree_shardings(frozen, mesh, rules)
        self.abstract_frozen = abstract(frozen, self.frozen_shardings)
        self.step = jit_train_step(models, self.tx, config, empty_prompt, mesh, self.state_shardings,
                                   self.frozen_shardings)

    def _init(self, params):
        return init_state(params, self.tx, self.config.seed, self.config.optim.ema_decay > 0)

    def fresh_state(self, trained: dict):
        params = sharding.put(jax.device_get(trained), self.state_shardings.params)
        return jax.jit(self._init, out_shardings=self.state_shardings)(params)

    def place(self, frozen: dict) -> dict:
        return sharding.put(jax.device_get(frozen), self.frozen_shardings)


def latent_scale(models, vae_params: dict, batches, num_batches: int = 8) -> float:
    """1 / std of the posterior means over a few batches: the `scaling_factor` that gives the
    diffusion model unit-variance latents (how SD's 0.18215 was chosen)."""
    encode = jax.jit(lambda p, x: models.vae.apply({"params": p}, x.astype(jnp.float32) / 127.5 - 1.0,
                                                    method="encode")[0])
    means = [np.asarray(encode(vae_params, next(batches)["image"])) for _ in range(num_batches)]
    return float(1.0 / np.std(np.concatenate(means)))


def _check_finite(state, checkpoints: Checkpoints) -> None:
    bad = int(jax.device_get(state.nan_step))
    if bad >= 0:
        checkpoints.wait()
        raise TrainingDiverged(f"step {bad}: the loss or gradient is not finite; stopped without saving it "
                               f"(last checkpoint: step {checkpoints.latest_step()})")


def _write_samples(models, params: dict, validation: list[dict], config, workdir: Path, writer, step: int) -> None:
    params = _host(params)  # a collective: every process takes part
    if not validation:
        return
    grid = sample_grid(models, params, validation, config.sample_steps, config.seed)
    (workdir / "samples").mkdir(exist_ok=True)
    grid.save(workdir / "samples" / f"step_{step:07d}.png")
    writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


def _summary_writer(workdir: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"))


def _log_metrics(workdir: Path, writer, step: int, values: dict, leader: bool) -> None:
    if not leader:
        return
    for k, v in values.items():
        writer.add_scalar(f"train/{k}", v, step)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")
