"""Memory per device of a training config's compiled step, from shapes only: no weights are read or allocated.

The stage's models are built under `jax.eval_shape` (random-weight shapes from `config.init`, or a base model's
configs), the real train step is lowered for a batch of ShapeDtypeStructs and compiled for the devices present,
and XLA's `memory_analysis()` of the compiled step is printed: arguments (params, optimizer state, frozen
models, batch), outputs, temporaries, and their total per device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tools/train_memory.py --config cg_sdxl_1024 --random-sdxl --config.data.batch_size=8

On a CPU this is the CPU compiler's buffer assignment for the same program (sizes of params and optimizer
state are exact; temporaries depend on the backend's fusion and scheduling, so treat them as an estimate of
a TPU's or GPU's). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bgjax.data.augment import PGAugmentConfig, draw_pg_batch
from bgjax.train import presets, sharding
from bgjax.train.config_file import load_config
from bgjax.train.loop import Trainer
from bgjax.train.models import load_stage


def batch_shapes(models, categories: dict, config, mesh) -> dict:
    """The loader's batch as ShapeDtypeStructs (cached latents unless config.data.dir is '' and --vae)."""
    n, size = config.data.batch_size, config.data.crop.resolution
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    tables = {k: v[:1] for k, v in models.prompt_tables(categories).items()}
    mask = np.zeros((1, size, size), np.uint8)
    mask[:, size // 4: 3 * size // 4, size // 3: 2 * size // 3] = 1
    one = {"image": np.zeros((1, size, size, 3), np.uint8), "mask": mask, "category_id": np.zeros(1, np.int32),
           "example_seed": np.zeros(1, np.uint32), "original_size": np.zeros((1, 2), np.int32),
           "crop_top_left": np.zeros((1, 2), np.int32), **tables,
           "latent_mean": np.zeros((1, size // factor, size // factor, 4), np.float32)}
    one["latent_logvar"] = one["latent_mean"]
    if config.stage == "pg":
        one.update(draw_pg_batch(mask, np.random.default_rng(0), PGAugmentConfig(**config.data.pg)))
    where = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype, sharding=where) for k, v in one.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a bundled config's name or a config file")
    p.add_argument("--random-sdxl", action="store_true", help="SDXL base's shapes from config.init (no base model)")
    p.add_argument("--categories", type=int, default=8)
    args, overrides = p.parse_known_args()
    config = load_config(args.config, overrides)
    if args.random_sdxl:
        config.model = ""
        config.init = {**presets.SDXL_RANDOM, config.stage: {}}
        if config.stage == "pg":  # no stage-1 model: PG's own step, with a shared identifier
            config.method.identifiers = "shared"
    categories = {f"category {i}": i for i in range(args.categories)}
    holder = {}

    def shapes():
        holder["models"], trained, frozen = load_stage(config, categories, jnp.dtype(config.dtype),
                                                       Path(tempfile.mkdtemp()))
        return trained, frozen

    trained, frozen = jax.eval_shape(shapes)
    models = holder["models"]
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    empty = {k: v[0] for k, v in models.prompts.batch([""], empty=True).items()}
    trainer = Trainer(config, models, trained, frozen, empty, mesh)
    t0 = time.perf_counter()
    compiled = trainer.step.lower(trainer.abstract_state, trainer.abstract_frozen,
                                  batch_shapes(models, categories, config, mesh)).compile()
    mem = compiled.memory_analysis()
    gib = {f"{k}_gib": round(getattr(mem, f"{k}_size_in_bytes", 0) / 2**30, 3)
           for k in ("argument", "output", "alias", "temp")}
    gib["total_gib"] = round(gib["argument_gib"] + gib["output_gib"] - gib["alias_gib"] + gib["temp_gib"], 3)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trained))
    frozen_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    print(json.dumps({
        "config": args.config, "stage": config.stage, "devices": len(jax.devices()), "backend": jax.default_backend(),
        "mesh": dict(mesh.shape), "global_batch": config.data.batch_size, "accum_steps": config.optim.accum_steps,
        "resolution": config.data.crop.resolution, "dtype": config.dtype, "remat": config.get("remat", None),
        "trained_params": count, "frozen_params": frozen_count, "compile_s": round(time.perf_counter() - t0, 1),
        **gib}), flush=True)


if __name__ == "__main__":
    main()
