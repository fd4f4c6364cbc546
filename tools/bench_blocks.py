"""Candidate kernels for the hot blocks of a SD-1.5 step, timed side by side and checked against a float32
reference on the same inputs (forward and gradients), before any of them goes into the models.

    python tools/bench_blocks.py                  # SD-1.5 shapes, batch 16 (a GPU)
    python tools/bench_blocks.py --size tiny      # seconds on a CPU

Workloads (bf16 inputs):
  attention  self-attention at 4096 tokens (heads of 40), 1024 (80) and 256 (160); cross-attention to 77
             CLIP tokens; the mask-guided cross-attention of CG: two XLA softmaxes, two cuDNN calls (each key
             set gathered to the front and cut by its count: cuDNN's padding mask), and one cuDNN call over
             both key sets stacked on the batch axis
  groupnorm  GroupNorm(32) + SiLU as flax computes it (statistics over (h, w, c/g) per group) against
             per-channel sums over (h, w) first (a column reduction in NHWC), then the group sums

Prints one JSON line per measurement: what, case, impl, ms forward, ms forward+backward, and rel_err of the
output and of each gradient against the float32 XLA reference.
"""

from __future__ import annotations

import argparse
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
from bench_util import median_time  # tools/, beside this script

from bgjax.models.attention import cudnn_keys, dot_product_attention, mask_guided_attention


def rel_err(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def compare(what: str, case: str, impls: dict, reference, inputs: tuple, cotangent, reps: int,
            flops: float | None = None, extra: tuple = ()) -> None:
    """Time each implementation forward and forward+backward (gradients of `inputs`; `extra` are passed
    along as arguments, never closed over: XLA would fold them as constants), and its error against
    `reference` (float32)."""
    ref_inputs = tuple(jnp.asarray(x, jnp.float32) for x in inputs)

    def vjp_of(f):
        def loss(*a):  # (*inputs, *extra, cotangent)
            return jnp.sum(f(*a[:-1]).astype(jnp.float32) * a[-1].astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs)))))

    extra = (*extra, cotangent)  # for the backward; the forward drops it
    ref_out = jax.jit(reference)(*ref_inputs, *extra[:-1])
    ref_grads = vjp_of(reference)(*ref_inputs, *extra)[1]
    for name, f in impls.items():
        try:
            fwd, bwd = jax.jit(f), vjp_of(f)
            out, (_, grads) = fwd(*inputs, *extra[:-1]), bwd(*inputs, *extra)
        except Exception as e:  # a kernel's own limits: reported, the others still run
            emit(what=what, case=case, impl=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            continue
        row = {"what": what, "case": case, "impl": name,
               "ms_fwd": 1e3 * median_time(functools.partial(fwd, *inputs, *extra[:-1]), warm=1, reps=reps),
               "ms_fwd_bwd": 1e3 * median_time(functools.partial(bwd, *inputs, *extra), warm=1, reps=reps),
               "rel_err_out": rel_err(out, ref_out)}
        row.update({f"rel_err_grad{i}": rel_err(g, r) for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))})
        if flops:
            row["tflops_fwd"] = flops / row["ms_fwd"] / 1e9
        emit(**row)


# ------------------------------------------------------------------ attention
def mask_guided_stacked(q, k, v, fg, bg, m, implementation="cudnn"):
    """One call instead of two: the foreground and background key sets (gathered, with their counts:
    `cudnn_keys`) stacked on the batch axis, the queries repeated."""
    (k_fg, v_fg, n_fg), (k_bg, v_bg, n_bg) = (cudnn_keys(k, v, (t > 0)[:, None, None, :]) for t in (fg, bg))
    lengths = jnp.concatenate([n_fg, n_bg])
    out = jax.nn.dot_product_attention(jnp.concatenate([q, q]), jnp.concatenate([k_fg, k_bg]),
                                       jnp.concatenate([v_fg, v_bg]), key_value_seq_lengths=lengths,
                                       implementation=implementation).astype(jnp.float32)
    a_fg, a_bg = jnp.split(out, 2)
    m = m[..., None]
    return (m * a_fg + (1.0 - m) * a_bg).astype(q.dtype)


def bench_attention(batch: int, sizes: dict, reps: int, kernels: tuple[str, ...]) -> None:
    dtype = jnp.bfloat16
    keys = iter(jax.random.split(jax.random.key(0), 64))
    for case, (tokens, heads, dim, kv) in sizes["self"].items():
        q, k, v, ct = (jax.random.normal(next(keys), (batch, t, heads, dim), dtype) for t in (tokens, kv, kv, tokens))
        impls = {impl: functools.partial(dot_product_attention, implementation=impl) for impl in ("xla", *kernels)}
        compare("attention", case, impls, functools.partial(dot_product_attention, implementation="xla"),
                (q, k, v), ct, reps, flops=4.0 * batch * heads * tokens * kv * dim)

    tokens, heads, dim = sizes["mask_guided"]
    q, ct = (jax.random.normal(next(keys), (batch, tokens, heads, dim), dtype) for _ in range(2))
    k, v = (jax.random.normal(next(keys), (batch, 77, heads, dim), dtype) for _ in range(2))
    position = jnp.arange(77)
    fg = jnp.broadcast_to((position < 8) | (position >= 20), (batch, 77)).astype(dtype)  # BOS/EOS/padding in both
    bg = jnp.broadcast_to((position == 0) | (position >= 6), (batch, 77)).astype(dtype)
    m = (jax.random.uniform(next(keys), (batch, tokens, 1)) > 0.6).astype(jnp.float32)
    impls = {"xla_two_softmaxes": functools.partial(mask_guided_attention, implementation="xla"),
             "xla_one_stacked_call": functools.partial(mask_guided_stacked, implementation="xla")}
    if "cudnn" in kernels:
        impls["cudnn_two_calls"] = functools.partial(mask_guided_attention, implementation="cudnn")
        impls["cudnn_one_stacked_call"] = mask_guided_stacked
    compare("mask_guided_attention", f"{tokens}x77_h{dim}", impls, impls["xla_two_softmaxes"], (q, k, v), ct, reps,
            extra=(fg, bg, m))


# ------------------------------------------------------------------ GroupNorm + SiLU
class FlaxGroupNormSiLU(nn.Module):
    groups: int = 32

    @nn.compact
    def __call__(self, x):
        return nn.silu(nn.GroupNorm(self.groups, epsilon=1e-5, dtype=jnp.float32)(x))


def group_norm_silu_by_channel(x, scale, bias, groups: int = 32, eps: float = 1e-5):
    """Statistics from per-channel sums over (h, w) (one column reduction in NHWC), then per group; the
    normalisation folded into one scale and shift per (batch, channel)."""
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32)
    sums = jnp.stack([jnp.sum(xf, axis=(1, 2)), jnp.sum(xf * xf, axis=(1, 2))])  # (2, B, C)
    sums = sums.reshape(2, b, groups, c // groups).sum(-1) / (h * w * (c // groups))
    mean, var = sums[0], jnp.maximum(sums[1] - sums[0] ** 2, 0.0)
    inv = jax.lax.rsqrt(var + eps)
    a = jnp.repeat(inv, c // groups, axis=-1) * scale
    d = bias - jnp.repeat(mean * inv, c // groups, axis=-1) * scale
    return nn.silu(xf * a[:, None, None, :] + d[:, None, None, :])


def bench_group_norm(batch: int, shapes: list[tuple[int, int, int]], reps: int) -> None:
    keys = iter(jax.random.split(jax.random.key(1), 64))
    for h, w, c in shapes:
        x = jax.random.normal(next(keys), (batch, h, w, c), jnp.bfloat16) * 2 + 0.5
        ct = jax.random.normal(next(keys), x.shape, jnp.bfloat16)
        module = FlaxGroupNormSiLU()
        params = module.init(jax.random.key(0), x)["params"]["GroupNorm_0"]
        params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
        scale, bias = params["scale"], params["bias"]

        def flax_impl(x, scale, bias, module=module):
            return module.apply({"params": {"GroupNorm_0": {"scale": scale, "bias": bias}}}, x).astype(jnp.bfloat16)

        def by_channel(x, scale, bias):
            return group_norm_silu_by_channel(x, scale, bias).astype(jnp.bfloat16)

        compare("groupnorm_silu", f"{batch}x{h}x{w}x{c}", {"flax": flax_impl, "by_channel": by_channel},
                lambda x, s, b: group_norm_silu_by_channel(x, s, b), (x, scale, bias), ct, reps)
        emit(what="groupnorm_silu_bytes", case=f"{batch}x{h}x{w}x{c}", mbytes_read_write=2 * x.size * 2 / 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--what", default="attention,groupnorm")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    kernels = {"gpu": ("cudnn",), "tpu": ("flash",)}.get(jax.default_backend(), ())
    emit(what="device", device=jax.devices()[0].device_kind, jax=jax.__version__)
    if args.size == "sd15":
        batch = 16
        sizes = {"self": {"self_4096_h40": (4096, 8, 40, 4096), "self_1024_h80": (1024, 8, 80, 1024),
                          "self_256_h160": (256, 8, 160, 256), "cross_4096_kv77_h40": (4096, 8, 40, 77)},
                 "mask_guided": (4096, 8, 40)}
        shapes = [(64, 64, 320), (64, 64, 960), (32, 32, 640), (16, 16, 1280)]
    else:
        batch = 2
        sizes = {"self": {"self_256_h8": (256, 2, 8, 256), "cross_256_kv77_h8": (256, 2, 8, 77)},
                 "mask_guided": (256, 2, 8)}
        shapes = [(16, 16, 64)]
    if "attention" in args.what:
        bench_attention(batch, sizes, args.reps, kernels)
    if "groupnorm" in args.what:
        bench_group_norm(batch, shapes, args.reps)


if __name__ == "__main__":
    main()
