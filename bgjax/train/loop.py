"""`bgjax train`: the training loop, top to bottom.

    data -> resume check (or return: already finished) -> mesh -> models -> state (fresh, or
    restored onto shapes) -> compiled step -> loop: step, log, checkpoint, stop on SIGTERM / Ctrl-C
    or at a non-finite step -> model directory (EMA or raw weights)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from bgjax.data.augment import CropConfig, PGAugmentConfig
from bgjax.data.convert import write_dataset
from bgjax.data.dataset import TrainingData, open_records, open_tfds
from bgjax.data.pipeline import PipelineConfig, make_dataset
from bgjax.data.sources import list_synthetic
from bgjax.models.configs import ConfigError
from bgjax.train import TrainingDiverged, sharding
from bgjax.train.checkpoint import Checkpoints, abstract
from bgjax.train.models import load_stage, save_model
from bgjax.train.resume import check_latent_cache, check_latent_vae, check_resume
from bgjax.train.samples import sample_grid, validation_set
from bgjax.train.step import init_state, jit_train_step, make_optimizer, program_flops

_log = logging.getLogger("bgjax.train")

# Dense bf16 peak per device, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0}


class Preemption:
    """SIGTERM or Ctrl-C: the loop saves at the next step and stops; a second Ctrl-C aborts at once.

    One process: the handlers set a flag, read every step. Several: jax's preemption service (on
    with jax.distributed) catches SIGTERM on any host and agrees with the others on the step to
    stop at, which each reads locally (orbax's `reached_preemption`), with no per-step collective;
    Ctrl-C passes itself on to it as a SIGTERM.
    """

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints, self.reason, self._interrupted = checkpoints, None, False
        self._distributed = jax.process_count() > 1
        # Several processes: SIGTERM stays with jax's service, which installed its handler.
        signals = (signal.SIGINT,) if self._distributed else (signal.SIGINT, signal.SIGTERM)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            _log.info("Ctrl-C: saving at the next step, then stopping (Ctrl-C again aborts)")
        self.reason = self.reason or ("interrupted" if signum == signal.SIGINT else "preempted")
        if self._distributed:
            os.kill(os.getpid(), signal.SIGTERM)

    def __call__(self, step: int) -> bool:
        if self._distributed:
            if self.checkpoints.manager.reached_preemption(step):
                self.reason = self.reason or "preempted"
                return True
            return False
        return self.reason is not None

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def prepare_data(config, workdir: Path) -> TrainingData:
    """The records `config.data` names: a TFDS dataset (`data.tfds`, first), a `bgjax data` folder (`data.dir`),
    or synthetic records written into WORKDIR/data."""
    if config.data.tfds:
        if config.data.dir:  # a bundled config's default folder, say
            _log.warning("data.dir (%s) is not read: data.tfds (%s) is set", config.data.dir, config.data.tfds)
        return open_tfds(config.data.tfds, config.data.tfds_data_dir, config.data.tfds_split)
    if config.data.dir:
        return open_records(config.data.dir)
    if config.data.synthetic_num <= 0:
        raise ConfigError("config.data.dir: no records given (or set data.tfds, or data.synthetic_num to generate "
                          "some)")
    out = workdir / "data"
    if jax.process_index() == 0 and not (out / "manifest.json").is_file():
        write_dataset(list_synthetic(config.data.synthetic_num, config.seed, config.data.synthetic_size), out,
                      workers=1)
    multihost_utils.sync_global_devices("bgjax synthetic data")
    return open_records(out)


def data_iterator(config, data: TrainingData | Path, prompt_tables: dict):
    processes = jax.process_count()
    if config.data.batch_size % processes:
        raise ConfigError(f"data.batch_size: {config.data.batch_size} is not divisible by {processes} processes")
    pipeline = PipelineConfig(batch_size=config.data.batch_size // processes, seed=config.seed,
                              workers=config.data.workers, crop=CropConfig(**config.data.crop),
                              pg=PGAugmentConfig(**config.data.pg) if config.stage == "pg" else None)
    return iter(make_dataset(data, pipeline, prompt_tables, jax.process_index(), processes))


def peak_tflops(config) -> float:
    if config.peak_tflops:
        return config.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in kind), 0.0)


def _host(tree):
    """Every process gets the whole arrays (sharded ones are gathered)."""
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def _source(config, step: int) -> str:
    return f"bgjax train ({config.stage}, step {step})"


def _finished(config, workdir: Path, step: int) -> bool:
    """The model in `workdir` was exported from checkpoint `step`, which reached num_steps."""
    manifest = workdir / "model" / "bgjax.json"
    return (step >= config.num_steps and manifest.is_file()
            and json.loads(manifest.read_text()).get("source") == _source(config, step))


def train(config, workdir: Path) -> dict:
    """Train `config.stage` in `workdir`, resuming from its latest checkpoint; returns a summary."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    leader = jax.process_index() == 0
    if config.export_weights not in ("ema", "raw"):
        raise ConfigError(f"export_weights: {config.export_weights!r} is not 'ema' or 'raw'")
    data = prepare_data(config, workdir)
    _log.info("data: %d records in %s", data.num_records, data.where)
    check_latent_cache(data.latents, config, data.where)
    meta = {"config": config.to_dict(), "data_fingerprint": data.fingerprint}
    checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
    try:
        start = checkpoints.latest_step()
        if start is not None:
            check_resume(config, checkpoints.meta(start), meta["data_fingerprint"], start, data.where)
            if _finished(config, workdir, start):
                _log.info("already trained to step %d; the model is in %s", start, workdir / "model")
                return {"step": start, "start": start, "compile_seconds": 0.0, "stopped": None}
        if leader:
            (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
        return _run(config, workdir, data, checkpoints, start, meta)
    finally:
        checkpoints.wait()
        checkpoints.close()


def _run(config, workdir: Path, data: TrainingData, checkpoints: Checkpoints, start: int | None,
         meta: dict) -> dict:
    leader = jax.process_index() == 0
    dtype = jnp.dtype(config.dtype)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    t0 = time.perf_counter()
    _log.info("building the %s stage's models%s", config.stage, f" from {config.model}" if config.model else "")
    # A resume restores the trained params, so they are only shapes here.
    models, trained, frozen = load_stage(config, data.categories, dtype, workdir, shapes_only=start is not None)
    check_latent_vae(data.latents, models.vae.config, data.where)
    tables = models.prompt_tables(data.categories) if models.prompts else {}
    empty = {k: v[0] for k, v in models.prompts.batch([""], empty=True).items()} if models.prompts else None
    batches = data_iterator(config, data, tables)

    trainer = Trainer(config, models, trained, frozen, empty, mesh)
    frozen = trainer.place(frozen)
    _log.info("models built in %.1f s", time.perf_counter() - t0)
    if start is None:
        state, start = trainer.fresh_state(trained), 0
    else:
        state = checkpoints.restore(start, trainer.abstract_state, batches)
        _log.info("resumed from step %d", start)
    del trained

    batch = sharding.global_batch(next(batches), mesh) if start < config.num_steps else None
    t0 = time.perf_counter()
    lowered = trainer.step.lower(state, frozen, batch) if batch is not None else None
    compiled = lowered.compile() if lowered is not None else None
    compile_s = time.perf_counter() - t0
    flops = program_flops(lowered) if lowered is not None else 0.0
    if compiled is not None:
        _log.info("train step compiled in %.1f s (%.3g TFLOP per device per step)", compile_s, flops / 1e12)

    writer = _summary_writer(workdir) if leader else None
    validation = validation_set(data, config.num_samples) if config.sample_every and leader else []
    preemption = Preemption(checkpoints)
    peak = peak_tflops(config)
    step, last_time, last_step, stopped = start, time.perf_counter(), start, None
    unchecked = None  # the previous step's metrics: its flag is read once this step is dispatched
    bar = tqdm(total=config.num_steps, initial=start, desc=f"train {config.stage}", disable=not leader)
    try:
        while step < config.num_steps:
            state, metrics = compiled(state, frozen, batch)
            step += 1
            if unchecked is not None:
                _check_finite(unchecked, state, checkpoints)
            unchecked = metrics
            preempted = preemption(step)
            log = step % config.log_every == 0 or step == config.num_steps
            save = step % config.checkpoint_every == 0 or step == config.num_steps or preempted
            sample = config.sample_every and step % config.sample_every == 0 and config.stage != "vae"
            if log or save or sample:  # nothing of a non-finite step is logged, saved or sampled
                _check_finite(metrics, state, checkpoints)
                unchecked = None
            if log:
                now = time.perf_counter()
                rate = (step - last_step) / (now - last_time)
                values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nan_step"}
                values.update(images_per_second=rate * config.data.batch_size, tflops_per_device=rate * flops / 1e12)
                if peak:
                    values["mfu"] = values["tflops_per_device"] / peak
                last_time, last_step = now, step
                _log_metrics(workdir, writer, step, values, leader)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_second']:.1f}")
            if save:
                checkpoints.save(step, state, batches, meta)
                _log.info("saving checkpoint %d (in the background)", step)
            if sample:
                _write_samples(models, {**frozen, **state.params}, validation, config, workdir, writer, step)
            bar.update(1)
            if preempted:
                stopped = preemption.reason
                break
            if step < config.num_steps:  # fetched after a save, so the saved iterator is at `step`
                batch = sharding.global_batch(next(batches), mesh)
    finally:
        preemption.close()
        bar.close()
        if writer is not None:
            writer.close()
    checkpoints.wait()
    if stopped is None:
        params = state.ema if config.export_weights == "ema" and state.ema is not None else state.params
        exported = _host({**{k: v for k, v in frozen.items() if k not in params}, **params})
        if config.stage == "vae":
            models.configs["vae"]["scaling_factor"] = latent_scale(models, exported["vae"], batches)
        if leader:
            save_model(models, config, exported, workdir / "model", _source(config, step))
            _log.info("model (%s weights) written to %s", "EMA" if params is state.ema else "raw", workdir / "model")
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


def _check_finite(metrics: dict, state, checkpoints: Checkpoints) -> None:
    """Raise if the step that gave `metrics` was not finite. `state` is from that step or the one
    after; either way it is the last good step's, since a non-finite step changes nothing."""
    bad = int(jax.device_get(metrics["nan_step"]))
    if bad >= 0:
        checkpoints.wait()
        raise TrainingDiverged(f"step {bad}: the loss or gradient is not finite; stopped without saving it "
                               f"(last checkpoint: step {checkpoints.latest_step()})", step=bad, state=state)


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
