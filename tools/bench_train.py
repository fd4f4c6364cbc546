"""The trainer's real CG step (bgjax.train) at SD-1.5 shapes with random weights: compile time,
the compiled step's memory per device, and (unless --memory-only) img/s, TFLOP/s and MFU.

By default batches carry cached VAE latents, as the PyTorch peer in ../shared/bench/ does
(it trains a ControlNet on latents); --vae encodes the 512 px images inside the step instead.
The text encoder runs in every step (CG trains the identifier embeddings through it).

    python tools/bench_train.py                          # one device, batch 16
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tools/bench_train.py --fsdp 8 --memory-only  # bytes per device with FSDP over 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bgjax.models.attention import set_attention_implementation
from bgjax.train import presets, sharding
from bgjax.train.config_file import load_config
from bgjax.train.loop import Trainer, peak_tflops
from bgjax.train.models import load_stage

UNET_FLOPS_SD15, CONTROLNET_FLOPS_SD15 = 803_273_441_280, 283_291_975_680  # torch FLOP counter, per image
CONFIG = "cg_sd15_512"  # bundled with bgjax


def synthetic_batch(models, categories: dict, batch: int, resolution: int, latents: bool) -> dict:
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    rng = np.random.default_rng(0)
    cid = np.arange(batch) % len(categories)
    tables = models.prompt_tables(categories)
    mask = np.zeros((batch, resolution, resolution), np.uint8)
    mask[:, resolution // 4: 3 * resolution // 4, resolution // 3: 2 * resolution // 3] = 1
    out = {"image": rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8), "mask": mask,
           "category_id": cid.astype(np.int32), "example_seed": np.arange(batch, dtype=np.uint32),
           **{k: v[cid] for k, v in tables.items()}}
    if latents:
        shape = (batch, resolution // factor, resolution // factor, 4)
        out["latent_mean"] = rng.standard_normal(shape).astype(np.float16)
        out["latent_logvar"] = np.full(shape, -6, np.float16)
    return out


def phase(name: str, since: float) -> float:
    print(f"[{time.perf_counter() - since:7.1f} s] {name}", file=sys.stderr, flush=True)
    return time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("sd15", "tiny"), default="sd15", help="tiny: a CPU smoke run at 64 px")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--vae", action="store_true", help="encode images in the step (no latent cache)")
    p.add_argument("--memory-only", action="store_true", help="compile from shapes only; allocate nothing")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    args = p.parse_args()
    set_attention_implementation(args.attention)

    config = load_config(CONFIG, [f"--config.data.batch_size={args.batch}", f"--config.mesh.fsdp={args.fsdp}",
                                  "--config.model=''"])
    if args.size == "sd15":
        config.init = {**presets.SD15_RANDOM, "cg": {}}
    else:
        config.init = {"vae": presets.TINY_VAE, "text_encoder": presets.TINY_TEXT_ENCODER, "unet": presets.TINY_UNET,
                       "cg": presets.TINY_BRANCH, "tokenizer": "byte", "scheduler": presets.SCHEDULER}
        config.data.crop.resolution = 64
    categories = {f"category {i}": i for i in range(8)}
    workdir = Path(tempfile.mkdtemp())
    dtype = jnp.bfloat16
    t = time.perf_counter()
    if args.memory_only:  # shapes only: the SD-1.5 weights are never materialised
        holder = {}

        def shapes():
            holder["models"], trained, frozen = load_stage(config, categories, dtype, workdir)
            return trained, frozen

        trained, frozen = jax.eval_shape(shapes)
        models = holder["models"]
    else:
        models, trained, frozen = load_stage(config, categories, dtype, workdir)
    t = phase("models", t)
    empty = {k: v[0] for k, v in models.prompts.batch([""], empty=True).items()}
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    trainer = Trainer(config, models, trained, frozen, empty, mesh)
    local = synthetic_batch(models, categories, args.batch, config.data.crop.resolution, not args.vae)
    t = phase("trainer", t)
    batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                    for k, v in local.items()}
    t0 = time.perf_counter()
    compiled = trainer.step.lower(trainer.abstract_state, trainer.abstract_frozen, batch_shapes).compile()
    compile_s = time.perf_counter() - t0
    t = phase("compiled", t)
    mem = compiled.memory_analysis()
    gib = {f"{k}_gib": getattr(mem, f"{k}_size_in_bytes", 0) / 2**30
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    gib["total_gib"] = gib["argument_gib"] + gib["output_gib"] - gib["alias_gib"] + gib["temp_gib"]
    row = {"what": "train_cg_step", "device": jax.devices()[0].device_kind, "devices": len(jax.devices()),
           "fsdp": args.fsdp, "batch": args.batch, "vae_in_step": args.vae, "compile_s": round(compile_s, 1), **gib}
    if not args.memory_only:
        state, frozen = trainer.fresh_state(trained), trainer.place(frozen)
        del trained
        batch = sharding.global_batch(local, mesh)
        times = []
        for _ in range(args.steps + 2):
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times[2:])
        cost = compiled.cost_analysis()
        flops = (args.batch * 3 * (UNET_FLOPS_SD15 + CONTROLNET_FLOPS_SD15) / len(jax.devices()) if args.size == "sd15"
                 else float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0)))
        row.update(s_per_step=dt, img_per_s=args.batch / dt, tflops_per_device=flops / dt / 1e12,
                   loss=float(metrics["loss"]))
        if peak_tflops(config):
            row["mfu"] = row["tflops_per_device"] / peak_tflops(config)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
