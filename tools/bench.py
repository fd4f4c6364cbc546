"""Benchmark bgjax against the diffusers (PyTorch) peer, side by side in one run, on one device.

Workloads (random weights, SD-1.5 shapes at 512 px, or SDXL base's at 1024 px with --base sdxl: its UNet and
a ControlNet of it, as StableDiffusionXLControlNetPipeline runs them, with the pooled text embedding and the time
ids; --size tiny shrinks either):
  denoise   UNet + ControlNet, and UNet + CG (mask-guided cross-attention), classifier-free guidance
            (batch doubled), bf16, batch 8
  train     ControlNet training step, batch 16, UNet frozen in bf16, ControlNet fp32 master
            weights with bf16 compute, AdamW (SDXL: both sides recompute activations in the backward pass,
            jax.checkpoint per transformer block / diffusers' gradient checkpointing, as SDXL trains)
  vae       VAE decode, batch 8, bf16
(the attention kernels and GroupNorm variants are tools/bench_blocks.py's)

Prints one JSON line per measurement (`side`: bgjax or peer) and a table at the end.
FLOPs per image forward are the torch FLOP counter's figures at SD-1.5 shapes (a training step with the
UNet frozen: 2 x UNet + 3 x ControlNet)
(UNet 803.3 G, ControlNet 283.3 G); at --size tiny XLA's cost analysis is used instead.

    python tools/bench.py                       # SD-1.5 shapes, bgjax and (if importable) diffusers
    python tools/bench.py --size tiny --no-peer # seconds on a CPU
    python tools/bench.py --base sdxl --train-batch 4 --infer-batch 4
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import optax
import profile_summary  # tools/, beside this script
from bench_util import median_time, random_params

from bgjax.models.attention import IMPLEMENTATIONS
from bgjax.models.components import build, param_shapes
from bgjax.models.controlnet import controlnet_params_from_unet
from bgjax.models.region import Region
from bgjax.models.unet import AddedCond
from bgjax.train import presets
from bgjax.train.step import program_flops

UNET_FLOPS_SD15, CONTROLNET_FLOPS_SD15 = 803_273_441_280, 283_291_975_680
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2)
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), sample_size=16, norm_num_groups=8,
                 attention_head_dim=4)
TINY_VAE = dict(SD15_VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8)

RESULTS: list[dict] = []


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What a run benchmarks: the UNet's and VAE's configs (diffusers' keys), the latent side, the text
    context's width and (SDXL) the pooled embedding's width; `hand_flops`: the SD-1.5 torch counts apply."""

    unet: dict
    vae: dict
    latent: int
    suffix: str = ""  # of the workload names: "_sdxl"
    hand_flops: bool = False

    @property
    def context(self) -> int:
        return self.unet["cross_attention_dim"]

    @property
    def pooled(self) -> int | None:
        if self.unet.get("addition_embed_type") != "text_time":
            return None
        return self.unet["projection_class_embeddings_input_dim"] - 6 * self.unet["addition_time_embed_dim"]


def _constructor_args(config: dict) -> dict:
    """A config.json dict without its "_class_name"-style keys, for the diffusers model's constructor."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def shapes_of(base: str, size: str) -> Shapes:
    if base == "sd15":
        return Shapes(SD15_UNET, SD15_VAE, 64, hand_flops=True) if size == "full" else Shapes(TINY_UNET, TINY_VAE, 16)
    if size == "full":
        return Shapes(_constructor_args(presets.SDXL_UNET), _constructor_args(presets.SDXL_VAE), 128, "_sdxl")
    return Shapes(_constructor_args(presets.TINY_SDXL_UNET), TINY_VAE, 16, "_sdxl")


def emit(**kw) -> None:
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


# ---------------------------------------------------------------- bgjax
def bench_bgjax(args, shapes: Shapes) -> None:
    bf16 = jnp.bfloat16
    sync = jax.block_until_ready
    latent, suffix = shapes.latent, shapes.suffix
    emit(side="bgjax", what="device", jax=jax.__version__, device=str(jax.devices()[0].device_kind),
         xla_flags=os.environ.get("XLA_FLAGS", ""))
    remat = shapes.pooled is not None  # SDXL trains with gradient checkpointing
    unet = build("unet", shapes.unet, bf16, attention=args.attention, remat=remat)
    cnet = build("controlnet", shapes.unet, bf16, attention=args.attention, remat=remat)
    k = jax.random.key(0)
    unet_params = random_params(param_shapes("unet", unet))
    cn_params = controlnet_params_from_unet(unet_params, random_params(param_shapes("controlnet", cnet), seed=1))
    unet_bf16 = jax.tree_util.tree_map(lambda p: p.astype(bf16), unet_params)
    del unet_params
    n_ctx = 77

    def inputs(b, dtype):
        ks = jax.random.split(jax.random.key(1), 5)
        added = None
        if shapes.pooled is not None:  # SDXL: the pooled embedding, and time ids of an uncropped square image
            size = 8 * latent
            added = AddedCond(jax.random.normal(ks[4], (b, shapes.pooled), dtype),
                              jnp.tile(jnp.array([size, size, 0, 0, size, size], dtype), (b, 1)))
        return (jax.random.normal(ks[0], (b, latent, latent, 4), dtype),
                jax.random.randint(ks[1], (b,), 0, 1000),
                jax.random.normal(ks[2], (b, n_ctx, shapes.context), dtype),
                jax.random.normal(ks[3], (b, 8 * latent, 8 * latent, 3), dtype), added)

    if "train" in args.what:
        b = args.train_batch
        x, t, ctx, cond, added = inputs(b, jnp.float32)
        noise = jax.random.normal(jax.random.key(2), x.shape)
        opt = optax.adamw(1e-5)
        opt_state = opt.init(cn_params)

        def loss_fn(cp, up):
            down, mid = cnet.apply({"params": cp}, x, t, ctx, cond, added=added)
            pred = unet.apply({"params": up}, x, t, ctx, down, mid, added=added)
            return jnp.mean((pred.astype(jnp.float32) - noise) ** 2)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(cp, os_, up):
            loss, grads = jax.value_and_grad(loss_fn)(cp, up)
            updates, os_ = opt.update(grads, os_, cp)
            return optax.apply_updates(cp, updates), os_, loss

        t0 = time.perf_counter()
        lowered = step.lower(cn_params, opt_state, unet_bf16)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        state = [cn_params, opt_state]

        def run():
            state[0], state[1], loss = compiled(state[0], state[1], unet_bf16)
            return loss

        dt = median_time(run, sync, args.warm, args.reps)
        fl = b * (2 * UNET_FLOPS_SD15 + 3 * CONTROLNET_FLOPS_SD15) if shapes.hand_flops else program_flops(lowered)
        mem = compiled.memory_analysis()
        emit(side="bgjax", what="train_controlnet_step" + suffix, batch=b, s_per_step=dt, img_per_s=b / dt,
             tflops=fl / dt / 1e12, compile_s=compile_s,
             temp_gb=getattr(mem, "temp_size_in_bytes", 0) / 2**30)
        cn_params = state[0]
        del state, opt_state, compiled

    cn_bf16 = jax.tree_util.tree_map(lambda p: p.astype(bf16), cn_params)
    if "denoise" in args.what:
        b = args.infer_batch
        x, t, ctx, cond, added = inputs(2 * b, bf16)
        # The plain ControlNet (the peer's workload), and the paper's CG: the same weights with mask-guided
        # cross-attention over the product region.
        mask = jnp.zeros((2 * b, 8 * latent, 8 * latent)).at[:, 2 * latent:6 * latent, 3 * latent:5 * latent].set(1)
        tokens = jnp.arange(n_ctx)
        region = Region(mask, jnp.broadcast_to(tokens < 8, (2 * b, n_ctx)).astype(bf16),
                        jnp.broadcast_to(tokens >= 6, (2 * b, n_ctx)).astype(bf16))
        cg = build("cg", shapes.unet, bf16, attention=args.attention)
        branches = {"controlnet": (cnet, None), "cg": (cg, region)}
        for name in args.branches.split(","):
            branch, branch_region = branches[name]

            @jax.jit
            def denoise(up, cp, x, t, ctx, cond, region, added, branch=branch):
                down, mid = branch.apply({"params": cp}, x, t, ctx, cond, 1.0, region, added)
                eps = unet.apply({"params": up}, x, t, ctx, down, mid, added=added)
                uncond, text = jnp.split(eps, 2)
                return uncond + 7.5 * (text - uncond)

            step_args = (unet_bf16, cn_bf16, x, t, ctx, cond, branch_region, added)
            t0 = time.perf_counter()
            lowered = denoise.lower(*step_args)
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
            dt = median_time(lambda c=compiled, a=step_args: c(*a), sync, args.warm, args.reps)
            fl = 2 * b * (UNET_FLOPS_SD15 + CONTROLNET_FLOPS_SD15) if shapes.hand_flops else program_flops(lowered)
            emit(side="bgjax", what="denoise_step_cfg" + suffix, branch=name, batch=b, s_per_step=dt,
                 img_per_s_25steps=b / (25 * dt), tflops=fl / dt / 1e12, compile_s=compile_s)
            if args.profile and name == "cg":
                profile_summary.profile(args.profile, compiled, lambda c=compiled, a=step_args: c(*a), steps=5)

    if "vae" in args.what:
        vae = build("vae", shapes.vae, bf16)
        vae_params = random_params(param_shapes("vae", vae), seed=2)
        vae_params = jax.tree_util.tree_map(lambda p: p.astype(bf16), vae_params)
        z = jax.random.normal(k, (args.infer_batch, latent, latent, 4), bf16)
        decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode)).lower(vae_params, z).compile()
        dt = median_time(lambda: decode(vae_params, z), sync, args.warm, max(3, args.reps // 2))
        emit(side="bgjax", what="vae_decode" + suffix, batch=args.infer_batch, s=dt)



# ---------------------------------------------------------------- peer (diffusers + PyTorch)
def bench_peer(args, shapes: Shapes) -> None:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    def sync(_):
        if dev == "cuda":
            torch.cuda.synchronize()

    latent, suffix = shapes.latent, shapes.suffix
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shapes.unet).to(dev)
    cnet = ControlNetModel.from_unet(unet).to(dev)
    if shapes.pooled is not None:  # as diffusers' SDXL ControlNet training runs (its --gradient_checkpointing)
        unet.enable_gradient_checkpointing()
        cnet.enable_gradient_checkpointing()
    emit(side="peer", what="device", torch=torch.__version__,
         device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")

    def inputs(b, dtype):
        added = None
        if shapes.pooled is not None:
            size = 8 * latent
            added = {"text_embeds": torch.randn(b, shapes.pooled, device=dev, dtype=dtype),
                     "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * b, device=dev, dtype=dtype)}
        return (torch.randn(b, 4, latent, latent, device=dev, dtype=dtype),
                torch.randint(0, 1000, (b,), device=dev),
                torch.randn(b, 77, shapes.context, device=dev, dtype=dtype),
                torch.randn(b, 3, 8 * latent, 8 * latent, device=dev, dtype=dtype), added)

    uf, cf = UNET_FLOPS_SD15, CONTROLNET_FLOPS_SD15
    if not shapes.hand_flops:
        from torch.utils.flop_counter import FlopCounterMode

        x, t, c, img, added = inputs(1, torch.float32)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            unet(x, t, c, added_cond_kwargs=added)
        uf = fc.get_total_flops()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            cnet(x, t, c, controlnet_cond=img, added_cond_kwargs=added)
        cf = fc.get_total_flops()

    unet_bf = unet.to(torch.bfloat16).requires_grad_(False)
    if "train" in args.what:
        b = args.train_batch
        cnet.train()
        opt = torch.optim.AdamW(cnet.parameters(), lr=1e-5)
        x, t, c, img, added = inputs(b, torch.float32)
        noise = torch.randn_like(x)

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16):
                down, mid = cnet(x, t, c, controlnet_cond=img, added_cond_kwargs=added, return_dict=False)
                pred = unet_bf(x, t, c, down_block_additional_residuals=[d.to(torch.bfloat16) for d in down],
                               mid_block_additional_residual=mid.to(torch.bfloat16), added_cond_kwargs=added).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt = median_time(step, sync, args.warm, args.reps)
        emit(side="peer", what="train_controlnet_step" + suffix, batch=b, s_per_step=dt, img_per_s=b / dt,
             tflops=b * (2 * uf + 3 * cf) / dt / 1e12)
        del opt
    cnet_bf = cnet.to(torch.bfloat16).eval()

    def denoiser(u, cn, b):
        x, t, c, img, added = inputs(2 * b, torch.bfloat16)

        @torch.inference_mode()
        def one():
            down, mid = cn(x, t, c, controlnet_cond=img, added_cond_kwargs=added, return_dict=False)
            eps = u(x, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    added_cond_kwargs=added).sample
            uncond, text = eps.chunk(2)
            return uncond + 7.5 * (text - uncond)
        return one

    if "denoise" in args.what:
        b = args.infer_batch
        dt = median_time(denoiser(unet_bf, cnet_bf, b), sync, args.warm, args.reps)
        emit(side="peer", what="denoise_step_cfg" + suffix, impl="eager", batch=b, s_per_step=dt,
             img_per_s_25steps=b / (25 * dt), tflops=2 * b * (uf + cf) / dt / 1e12)
        if args.torch_compile:
            t0 = time.perf_counter()
            one = denoiser(torch.compile(unet_bf), torch.compile(cnet_bf), b)
            sync(one())
            compile_s = time.perf_counter() - t0
            dt = median_time(one, sync, args.warm, args.reps)
            emit(side="peer", what="denoise_step_cfg" + suffix, impl="torch.compile", batch=b, s_per_step=dt,
                 img_per_s_25steps=b / (25 * dt), tflops=2 * b * (uf + cf) / dt / 1e12, compile_s=compile_s)

    if "vae" in args.what:
        vae = AutoencoderKL(**shapes.vae).to(dev, torch.bfloat16).eval()
        z = torch.randn(args.infer_batch, 4, latent, latent, device=dev, dtype=torch.bfloat16)
        with torch.inference_mode():
            dt = median_time(lambda: vae.decode(z).sample, sync, args.warm, max(3, args.reps // 2))
        emit(side="peer", what="vae_decode" + suffix, batch=args.infer_batch, s=dt)


def table() -> str:
    rows = ["| workload | side | time | throughput |", "| --- | --- | --- | --- |"]
    for r in RESULTS:
        if r["what"].startswith(("train_controlnet_step", "denoise_step_cfg")):
            thr = (f"{r['img_per_s']:.1f} img/s" if "img_per_s" in r else f"{r['img_per_s_25steps']:.2f} img/s @25")
            name = r["what"] + "".join(f" ({r[k]})" for k in ("branch", "impl") if k in r) + f" B={r['batch']}"
            rows.append(f"| {name} | {r['side']} | {r['s_per_step'] * 1e3:.1f} ms | {thr}, {r['tflops']:.3g} TFLOP/s |")
        elif r["what"].startswith("vae_decode"):
            rows.append(f"| {r['what']} B={r['batch']} | {r['side']} | {r['s'] * 1e3:.1f} ms | |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--what", default="train,denoise,vae")
    p.add_argument("--profile", metavar="DIR", help="a jax.profiler trace of the UNet + CG denoise step, top ops")
    p.add_argument("--branches", default="controlnet,cg", help="denoise: plain ControlNet and/or CG")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--infer-batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warm", type=int, default=3, help="untimed calls first")
    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto",
                   help="bgjax attention implementation inside the models")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip the diffusers side")
    p.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    p.add_argument("--no-bgjax", dest="bgjax", action="store_false", help="only the diffusers side")
    args = p.parse_args()
    shapes = shapes_of(args.base, args.size)
    if args.bgjax:
        bench_bgjax(args, shapes)
    if args.peer:
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            emit(side="peer", what="skipped", reason=str(e))
        else:
            bench_peer(args, shapes)
    print(table())


if __name__ == "__main__":
    main()
