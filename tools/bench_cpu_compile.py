"""The sampling program on the CPU at XLA's default LLVM optimisation level and at level 1
(`program.sample_on_cpu`, what `program.run` uses on a CPU): compile time, time per call and whether the
images agree bit for bit.

    python tools/bench_cpu_compile.py                      # the bundled model, the demo's 64 px row: ~1 min
    python tools/bench_cpu_compile.py --size 256 --steps 5 # larger latents, where run time outweighs compiling

One JSON line per option set; the calls of the two alternate, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from bgjax import demo
from bgjax.sampling import program
from bgjax.sampling.pipeline import BackgroundPipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=demo.MODEL)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="images per call (twice that through the UNet: guidance)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    pipe = BackgroundPipeline.from_pretrained(args.model)
    prepared = pipe.prepare(demo.cutout_path("coffee mug"), category="coffee mug", size=args.size)
    conditions = program.Conditions(prepared.prompt, pipe.inputs.negative(""), prepared.identifier_row, prepared.mask,
                                    prepared.cg_cond, None, known=prepared.cg_cond)
    sampler = program._sampler("dpmpp_2m", json.dumps(pipe.scheduler_config, sort_keys=True), args.steps)

    def batched(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a, (args.batch, *a.shape))

    call = (np.uint32(0), np.arange(args.batch, dtype=np.int32), None, batched(conditions.mask),
            batched(conditions.cg_cond), None, batched(conditions.known), *[np.float32(s) for s in (7.5, 1, 0, 0)])
    jitted = {"default": program.sample, "cpu_options": program.sample_on_cpu}
    compiled, compile_s = {}, {}
    for name, fn in jitted.items():
        lowered = fn.lower(pipe.models, sampler, pipe.params, conditions.prompt_arrays(), *call)
        t0 = time.perf_counter()
        compiled[name] = lowered.compile()
        compile_s[name] = time.perf_counter() - t0
    seconds, images = {name: [] for name in compiled}, {}
    for _ in range(args.reps + 1):  # the first call of each is a warm-up
        for name, fn in compiled.items():
            t0 = time.perf_counter()
            images[name] = np.asarray(jax.block_until_ready(fn(pipe.params, conditions.prompt_arrays(), *call))[1])
            seconds[name].append(time.perf_counter() - t0)
    same = bool(np.array_equal(images["default"], images["cpu_options"]))
    for name in compiled:
        print(json.dumps({"what": "sample_cpu_compile", "options": name, "size": args.size, "batch": args.batch,
                          "steps": args.steps, "compile_s": round(compile_s[name], 2),
                          "s_per_call": round(float(np.median(seconds[name][1:])), 3),
                          "identical_images": same}), flush=True)


if __name__ == "__main__":
    main()
