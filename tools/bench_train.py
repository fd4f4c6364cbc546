"""The trainer's real CG or PG step (bgjax.train) at SD-1.5 shapes (512 px) or SDXL base's (--base sdxl, 1024 px)
with random weights: compile time, the compiled step's memory per device, XLA's FLOPs per step, and (unless
--memory-only) img/s, TFLOP/s and MFU. The step is configured by the bundled config of that base and stage
(cg_sd15_512, cg_sdxl_1024, ...: SDXL's brings gradient checkpointing); trailing --config.x=y override it.

By default batches carry cached VAE latents, as the PyTorch peer's ControlNet step trains on latents;
--vae encodes the 512 px images inside the step instead. The text encoder runs in every step (CG trains the
identifier embeddings through it). The PG step is PG's alone: without a stage-1 model on disk there is no
frozen CG beside it (bgjax train's stage 2 adds CG's forward, about 283 GFLOP per image).

    python tools/bench_train.py                          # CG, one device, batch 16
    python tools/bench_train.py --stage pg --batch 32
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tools/bench_train.py --fsdp 8 --memory-only  # bytes per device with FSDP over 8
    python tools/bench_train.py --size tiny --steps 2    # seconds on a CPU
    python tools/bench_train.py --base sdxl --batch 8    # the CG step over SDXL base at 1024 px

Prints one JSON line: side, what (train_cg_step / train_pg_step), batch, s_per_step, img_per_s, compile_s,
device, memory (compiled: argument/output/temp GiB; peak_gib from the allocator where it reports one), flops
(XLA's, per device and step) and, at full SD-1.5 shapes, hand_flops (torch's per-image forward counts: the frozen
UNet forward and backward to its inputs, 2x, the trained branch 3x).
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
import profile_summary  # tools/, beside this script
from bench_util import random_params

from bgjax import compile_cache
from bgjax.data.augment import PGAugmentConfig, draw_pg_batch
from bgjax.models.attention import IMPLEMENTATIONS
from bgjax.train import presets, sharding
from bgjax.train.config_file import load_config
from bgjax.train.loop import Trainer, peak_tflops
from bgjax.train.models import load_stage
from bgjax.train.step import program_flops

UNET_FLOPS_SD15, CONTROLNET_FLOPS_SD15 = 803_273_441_280, 283_291_975_680  # torch FLOP counter, per image


def synthetic_batch(models, categories: dict, batch: int, resolution: int, latents: bool, pg: bool) -> dict:
    """Random images and latents, a product box, the categories' prompts; where each crop came from (SDXL's
    time ids: the whole image, uncropped)."""
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    rng = np.random.default_rng(0)
    cid = np.arange(batch) % len(categories)
    tables = models.prompt_tables(categories)
    mask = np.zeros((batch, resolution, resolution), np.uint8)
    mask[:, resolution // 4: 3 * resolution // 4, resolution // 3: 2 * resolution // 3] = 1
    out = {"image": rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8), "mask": mask,
           "category_id": cid.astype(np.int32), "example_seed": np.arange(batch, dtype=np.uint32),
           "original_size": np.full((batch, 2), resolution, np.int32), "crop_top_left": np.zeros((batch, 2), np.int32),
           **{k: v[cid] for k, v in tables.items()}}
    if latents:
        shape = (batch, resolution // factor, resolution // factor, 4)
        out["latent_mean"] = rng.standard_normal(shape).astype(np.float16)
        out["latent_logvar"] = np.full(shape, -6, np.float16)
    if pg:  # each image mixes with another one, as the loader's partner draw gives it
        out.update(draw_pg_batch(mask, rng, PGAugmentConfig()), pg_partner_image=np.roll(out["image"], -1, axis=0))
    return out


def phase(name: str, since: float) -> float:
    print(f"[{time.perf_counter() - since:7.1f} s] {name}", file=sys.stderr, flush=True)
    return time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("cg", "pg"), default="cg")
    p.add_argument("--base", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: a CPU smoke run at 64 px")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--vae", action="store_true", help="encode images in the step (no latent cache)")
    p.add_argument("--memory-only", action="store_true", help="compile from shapes only; allocate nothing")
    p.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS)
    p.add_argument("--profile", metavar="DIR", help="a jax.profiler trace of 3 steps in DIR, and its top ops")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="do not use bgjax's persistent compilation cache ($BGJAX_COMPILE_CACHE)")
    args, overrides = p.parse_known_args()
    if unknown := [o for o in overrides if not o.startswith("--config.")]:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like --config.remat=False)")

    if args.compile_cache:  # the same programs as the next run's: a second run loads them (issue 14's <= 5 s)
        compile_cache.enable(compile_cache.default_dir())
    name = {"sd15": f"{args.stage}_sd15_512", "sdxl": f"{args.stage}_sdxl_1024"}[args.base]  # bundled configs
    config = load_config(name, [f"--config.data.batch_size={args.batch}", f"--config.mesh.fsdp={args.fsdp}",
                                "--config.model=''", f"--config.attention={args.attention}",
                                "--config.optim.accum_steps=1", *overrides])
    if args.size == "full":
        config.init = {**(presets.SD15_RANDOM if args.base == "sd15" else presets.SDXL_RANDOM), args.stage: {}}
    else:
        sd15 = {"vae": presets.TINY_VAE, "text_encoder": presets.TINY_TEXT_ENCODER, "unet": presets.TINY_UNET,
                "tokenizer": "byte", "scheduler": presets.SCHEDULER}
        config.init = {**(sd15 if args.base == "sd15" else presets.TINY_SDXL_RANDOM), args.stage: presets.TINY_BRANCH}
        config.data.crop.resolution = 64
    if args.stage == "pg":  # a PG stage without a base model: its own random identifiers are not needed
        config.method.identifiers = "shared"
    categories = {f"category {i}": i for i in range(8)}
    workdir = Path(tempfile.mkdtemp())
    dtype = jnp.bfloat16
    t = time.perf_counter()
    holder = {}

    def shapes():
        holder["models"], trained, frozen = load_stage(config, categories, dtype, workdir)
        return trained, frozen

    # Shapes first (the models' own init would compile each model's forward); --memory-only stops there.
    trained, frozen = jax.eval_shape(shapes)
    models = holder["models"]
    if not args.memory_only:
        trained, frozen = random_params((trained, frozen))
    t = phase("models", t)
    empty = {k: v[0] for k, v in models.prompts.batch([""], empty=True).items()}
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    trainer = Trainer(config, models, trained, frozen, empty, mesh)
    local = synthetic_batch(models, categories, args.batch, config.data.crop.resolution, not args.vae,
                            args.stage == "pg")
    t = phase("trainer", t)
    batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                    for k, v in local.items()}
    t0 = time.perf_counter()
    lowered = trainer.step.lower(trainer.abstract_state, trainer.abstract_frozen, batch_shapes)
    lower_s = time.perf_counter() - t0
    t = phase("traced and lowered", t)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0 - lower_s
    t = phase("compiled", t)
    mem = compiled.memory_analysis()
    gib = {f"{k}_gib": getattr(mem, f"{k}_size_in_bytes", 0) / 2**30
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    gib["total_gib"] = gib["argument_gib"] + gib["output_gib"] - gib["alias_gib"] + gib["temp_gib"]
    flops = program_flops(lowered)
    what = f"train_{args.stage}_step" + ("_sdxl" if args.base == "sdxl" else "")
    row = {"side": "bgjax", "what": what, "resolution": config.data.crop.resolution, "remat": bool(config.remat),
           "device": jax.devices()[0].device_kind, "devices": len(jax.devices()), "fsdp": args.fsdp,
           "batch": args.batch, "attention": args.attention,
           "vae_in_step": args.vae, "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
           "compile_cache": bool(args.compile_cache), "flops": flops, **gib}
    if args.size == "full" and args.base == "sd15":
        row["hand_flops"] = args.batch * (2 * UNET_FLOPS_SD15 + 3 * CONTROLNET_FLOPS_SD15) / len(jax.devices())
    print(json.dumps({**row, "phase": "compiled"}), flush=True)  # before anything runs: an OOM keeps this line
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
        row.update(s_per_step=dt, img_per_s=args.batch / dt, tflops_per_device=flops / dt / 1e12,
                   loss=float(metrics["loss"]))
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            row["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
        if peak_tflops(config):
            row["mfu"] = row["tflops_per_device"] / peak_tflops(config)
        print(json.dumps(row), flush=True)
        if args.profile:
            carried = [state]  # the state is donated: each traced step takes the last one's

            def one_step():
                carried[0], metrics = compiled(carried[0], frozen, batch)
                return metrics["loss"]

            profile_summary.profile(args.profile, compiled, one_step, steps=3)


if __name__ == "__main__":
    main()
