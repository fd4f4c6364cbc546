"""Time BackgroundPipeline end to end (prompt, 25-step sampling loop with CFG, VAE decode, paste-back)
with random weights at SD-1.5 shapes, 512 px, bf16: UNet + CG, and UNet + CG + PG with a reference.

    python tools/bench_generate.py                 # on a GPU
    python tools/bench_generate.py --size tiny     # seconds on a CPU

Prints one JSON line per measurement. Also checks that image 0 of a batch of 8 equals image 0 generated
alone (batch-size independence; on GPUs the convolution algorithms may differ with the batch size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import random_params  # tools/, beside this script

from bgjax.method.config import MethodConfig
from bgjax.method.denoiser import Denoiser
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from bgjax.models.components import build, param_shapes
from bgjax.models.text_encoder import load_tokenizer
from bgjax.sampling.pipeline import BackgroundPipeline, Models

UNET = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 +
            ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu")
TINY = dict(unet=dict(UNET, block_out_channels=(32, 32, 64, 64), sample_size=16, norm_num_groups=8,
                      attention_head_dim=4, cross_attention_dim=32),
            vae=dict(VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
            clip=dict(CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")


def random_pipeline(sizes: dict, dtype) -> BackgroundPipeline:
    modules, params = {}, {}
    for kind, cfg in (("unet", sizes["unet"]), ("cg", sizes["unet"]), ("pg", sizes["unet"]), ("vae", sizes["vae"]),
                      ("text_encoder", sizes["clip"])):
        modules[kind] = build(kind, cfg, dtype)
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_shapes(kind, modules[kind]))
        params[kind] = random_params(shapes, seed=len(params))
    denoiser = Denoiser(modules["unet"], modules["cg"], modules["pg"])
    hidden = sizes["clip"]["hidden_size"]
    all_params = {"denoiser": {k: params[k] for k in ("unet", "cg", "pg")}, "text_encoder": params["text_encoder"],
                  "vae": params["vae"], "identifiers": np.random.default_rng(0).normal(size=(2, hidden)) * 0.02}
    with tempfile.TemporaryDirectory() as tmp:  # byte-level, ids < 514: enough to time the text encoder
        tok = load_tokenizer(write_byte_tokenizer(Path(tmp)))
    return BackgroundPipeline(Path("random"), Models(denoiser, modules["text_encoder"], modules["vae"]), all_params,
                              tok, SCHEDULER, MethodConfig(), ["rice cooker", "lamp"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--what", default="cg,cg+pg,alone",
                        help="cg, cg+pg (with a reference), alone (image 0 alone against in the batch)")
    args = parser.parse_args()
    sizes = TINY if args.size == "tiny" else dict(unet=UNET, vae=VAE, clip=CLIP)
    print(json.dumps({"what": "device", "devices": [d.device_kind for d in jax.local_devices()],
                      "jax": jax.__version__}), flush=True)
    t = time.perf_counter()
    pipe = random_pipeline(sizes, jnp.bfloat16)
    print(json.dumps({"what": "random model built", "s": round(time.perf_counter() - t, 1)}), flush=True)
    side = pipe.resolution
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (side, side, 3), np.uint8)
    mask = np.zeros((side, side), bool)
    mask[side // 4: 3 * side // 4, side // 3: 2 * side // 3] = True
    reference = {"reference": rng.integers(0, 256, (side, side, 3), np.uint8), "reference_mask": mask}
    runs = {}
    for name, extra in (("cg", {}), ("cg+pg", reference)):
        if name not in args.what.split(","):
            continue
        def call(n=args.num_images, extra=extra):
            return pipe(photo, mask, "lamp", num_images=n, steps=args.steps, **extra)

        t = time.perf_counter()
        runs[name] = np.asarray(call()[0])
        first = time.perf_counter() - t
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        print(json.dumps({"side": "bgjax", "what": f"generate_{name.replace('+', '_')}", "batch": args.num_images,
                          "num_images": args.num_images, "steps": args.steps,
                          "px": side, "first_call_s": round(first, 1), "s": round(s, 3),
                          "img_per_s": round(args.num_images / s, 2), "ms_per_step_upper_bound": round(
                              1000 * s / args.steps, 1)}), flush=True)
    if "alone" not in args.what.split(",") or "cg" not in runs:
        return
    alone = np.asarray(pipe(photo, mask, "lamp", num_images=1, steps=args.steps)[0])
    diff = np.abs(alone.astype(int) - runs["cg"])
    print(json.dumps({"what": f"image 0 alone vs in a batch of {args.num_images}", "max_abs_diff": int(diff.max()),
                      "mean_abs_diff": round(float(diff.mean()), 4)}), flush=True)


if __name__ == "__main__":
    main()
