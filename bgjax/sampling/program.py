"""The jitted program of generation: prompt encoding, the whole sampling loop (a `lax.scan` over the sampler's
steps, classifier-free guidance) and the VAE decode, compiled once per shape; `run` feeds it batches sharded
over the local devices.

It knows nothing of files or photos: it takes the `Models`, their params, a `SamplingSettings` and the
conditions at the working size (`Conditions`), and returns latents and images in [0, 1]. The host side
(`bgjax.sampling.host`) makes the conditions and pastes the product back.

SDXL (a second text encoder) conditions as `StableDiffusionXLPipeline` does: the context and pooled embedding
of `bgjax.method.text.TextEncoders`, zeros for the unconditional pass where the pipeline zeros it, and time ids
(original size, crop corner (0, 0), target size) at the working size, for the UNet and the branches alike.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bgjax.method.denoiser import Denoiser
from bgjax.method.prompt_text import Prompt
from bgjax.method.text import IDENTIFIERS, TextEncoders
from bgjax.models.region import Region
from bgjax.models.unet import AddedCond
from bgjax.sampling import memory
from bgjax.sampling.edge_fill import refill_edge
from bgjax.sampling.schedulers import Sampler, make_sampler

_TRACES: collections.Counter = collections.Counter()


def traces() -> int:
    """How often the sampling program has been traced in this process (a retrace detector)."""
    return _TRACES["sample"]


@dataclasses.dataclass(frozen=True)
class Models:
    """The modules of the jitted program: a static argument, hashable by value, so pipelines loaded
    from the same model share compiled programs."""

    denoiser: Denoiser
    text_encoder: nn.Module
    vae: nn.Module
    text_encoder_2: nn.Module | None = None  # SDXL's second text encoder

    @property
    def text_encoders(self) -> TextEncoders:
        return TextEncoders.of({"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2})

    @property
    def vae_factor(self) -> int:
        """How many pixels one latent position spans along each axis."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How the program samples: the sampler and its step count (static: they shape the program), the
    guidance scale and the branch scales (traced: changing them compiles nothing). A branch scale of None
    means the branch does not run; `lambda_pg_uncond` is PG's scale in the unconditional pass (None: as in
    the conditional one; 0 for style guidance)."""

    sampler: str = "dpmpp_2m"
    steps: int = 25
    guidance: float = 7.5
    lambda_cg: float | None = None
    lambda_pg: float | None = None
    lambda_pg_uncond: float | None = None

    def scalars(self) -> list[np.float32]:
        """guidance, lambda_cg, lambda_pg and PG's unconditional scale as the program's traced values."""
        pg_uncond = self.lambda_pg if self.lambda_pg_uncond is None else self.lambda_pg_uncond
        return [np.float32(v or 0.0) for v in (self.guidance, self.lambda_cg, self.lambda_pg, pg_uncond)]


@dataclasses.dataclass(frozen=True)
class Conditions:
    """One product's conditions at the working size (h, w): the prompts and the branches' images."""

    prompt: Prompt
    negative: Prompt
    identifier_row: int  # the identifier table's row for the prompt (0 for a shared one)
    mask: np.ndarray  # (h, w) float32 M
    cg_cond: np.ndarray | None  # (h, w, C) the CG slot's image; None: CG does not run
    pg_cond: np.ndarray | None  # (h, w, 3) c_pg; None: PG does not run
    zero_negative: bool = False  # SDXL: the unconditional context and pooled embedding are zeros
    # (h, w, 3) in [-1, 1]: an image whose latents are kept in the latent cells the mask covers whole
    # (`sample`); None: every latent is generated
    known: np.ndarray | None = None
    # the latents at the product's edge refilled from the background around them before decoding (`edge_fill`)
    edge_fill: bool = False

    def prompt_arrays(self) -> dict[str, np.ndarray]:
        """Row 0 the conditional, row 1 the unconditional prompt."""
        keys = ("input_ids", "fg_tokens", "bg_tokens") + (("input_ids_2",) if self.prompt.input_ids_2 is not None
                                                           else ())
        arrays = {k: np.stack([getattr(self.prompt, k), getattr(self.negative, k)]) for k in keys}
        arrays["identifier_index"] = np.array([self.prompt.identifier_index, -1], np.int32)
        arrays["identifier_row"] = np.array([self.identifier_row, 0], np.int32)
        arrays["zeroed"] = np.array([False, self.zero_negative])
        return arrays


@functools.lru_cache(maxsize=32)
def _sampler(name: str, scheduler_json: str, steps: int) -> Sampler:
    # Samplers hash by identity: one object per setting keeps the jit cache warm across calls.
    return make_sampler(name, json.loads(scheduler_json), steps)


def encode_prompts(models: Models, params: dict, prompts: dict) -> tuple[jax.Array, jax.Array | None]:
    """(context (2, L, D), SDXL's pooled embedding (2, P) or None) of the conditional and the unconditional
    prompt; the unconditional row zeroed where `prompts["zeroed"]` says. Without identifier tables (None: a
    base model, or a variant without them) the placeholder stays an ordinary token."""
    encoders = models.text_encoders
    names = (*encoders.kinds, *(IDENTIFIERS[k] for k in encoders.kinds))
    text = encoders({k: params[k] for k in names if params.get(k) is not None}, prompts).zeroed(prompts["zeroed"])
    return text.context, text.pooled


def time_ids(height: int, width: int) -> np.ndarray:
    """SDXL's added time ids of a generation at (height, width) px: original size, crop corner, target size,
    as `StableDiffusionXLPipeline` makes them by default (original = target = the output size, no crop)."""
    return np.array([height, width, 0, 0, height, width], np.float32)


def _sample(models: Models, sampler: Sampler, params: dict, prompts: dict, seed: jax.Array, indices: jax.Array,
           latents: jax.Array | None, mask: jax.Array, cg_cond: jax.Array | None, pg_cond: jax.Array | None,
           known: jax.Array | None, guidance: jax.Array, lambda_cg: jax.Array, lambda_pg: jax.Array,
           lambda_pg_uncond: jax.Array, edge_fill: bool = False) -> tuple[jax.Array, jax.Array]:
    """(final latents (B, h/f, w/f, C), images (B, h, w, 3) in [0, 1]) for the images `indices` (B,) of `seed`,
    or from `latents` (B, h/f, w/f, C) instead of the seeded noise; conditions are (B, h, w, ...). The prompts'
    row 0 is the conditional, row 1 the unconditional (negative) prompt. PG's residuals are scaled by
    `lambda_pg` in the conditional pass, by `lambda_pg_uncond` in the other. With a `known` image, the latent
    cells that `mask` covers whole hold its encoding after every step (noised to the next timestep with the
    initial noise: `Sampler.renoised`), so the product's latents are the VAE's own, not the UNet's guess. With
    `edge_fill` the final latents at the product's edge are refilled from the background around them
    (`edge_fill.refill_edge`) and those are the latents returned and decoded."""
    _TRACES["sample"] += 1  # runs only while tracing
    vae_cfg, factor = models.vae.config, models.vae_factor
    batch, height, width = mask.shape
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(jax.random.key(seed), i)))(indices)
    init_keys, step_keys = keys[:, 0], keys[:, 1]
    shape = (height // factor, width // factor, vae_cfg.latent_channels)
    if latents is None:
        latents = jax.vmap(lambda k: jax.random.normal(k, shape))(init_keys)
    latents = latents.astype(jnp.float32)
    x = latents * sampler.init_noise_sigma  # as diffusers' prepare_latents, given or drawn
    if known is not None:
        mean, _ = models.vae.apply({"params": params["vae"]}, known, method=models.vae.encode)
        known_x0 = (mean.astype(jnp.float32) - vae_cfg.shift_factor) * vae_cfg.scaling_factor
        cells = mask.reshape(batch, shape[0], factor, shape[1], factor).min(axis=(2, 4))
        covered = (cells >= 0.5)[..., None]

    # Each image's conditional and unconditional rows sit next to each other ((B, 2, ...) -> (2B, ...)),
    # so the doubled batch stays on the image's device. The unconditional pass keeps the branch conditions
    # (PG's at lambda_pg_uncond: 0 with style guidance).
    def pair(a: jax.Array) -> jax.Array:
        return jnp.stack([a, a], axis=1).reshape(2 * batch, *a.shape[1:])

    def pair_prompts(a: jax.Array) -> jax.Array:  # (2, ...) cond / uncond -> (2B, ...)
        return jnp.broadcast_to(a, (batch, *a.shape)).reshape(2 * batch, *a.shape[1:])

    context, pooled = encode_prompts(models, params, prompts)
    context = pair_prompts(context)
    added = None if pooled is None else AddedCond(
        pair_prompts(pooled), jnp.broadcast_to(time_ids(height, width), (2 * batch, 6)))
    region = Region(pair(mask), pair_prompts(prompts["fg_tokens"]), pair_prompts(prompts["bg_tokens"]))
    cg2 = None if cg_cond is None else pair(cg_cond)
    pg2 = None if pg_cond is None else pair(pg_cond)
    pg_scales = pair_prompts(jnp.stack([lambda_pg, lambda_pg_uncond])).reshape(2 * batch, 1, 1, 1)

    def step(carry, i):
        x, state = carry
        out = models.denoiser(params["denoiser"], pair(sampler.scale_model_input(x, i)), sampler.timestep(i), context,
                              region, cg2, pg2, lambda_cg, pg_scales, added).reshape(batch, 2, *x.shape[1:])
        eps = out[:, 1] + guidance * (out[:, 0] - out[:, 1])
        noise = None
        if sampler.name == "ddpm":
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:]))(step_keys)
        x, state = sampler.step(state, eps, i, x, noise=noise)
        if known is not None:
            x = jnp.where(covered, sampler.renoised(known_x0, latents, i), x)
        return (x, state), None

    (x, _), _ = jax.lax.scan(step, (x, sampler.init_state(x)), jnp.arange(sampler.num_inference_steps))
    if edge_fill:
        x = refill_edge(x, mask, factor)
    images = models.vae.apply({"params": params["vae"]}, x / vae_cfg.scaling_factor + vae_cfg.shift_factor,
                              method=models.vae.decode)
    return x, (jnp.clip(images.astype(jnp.float32), -1, 1) + 1) / 2


# XLA's CPU backend compiles the sampling program in 28 to 32 % less time at LLVM optimisation level 1 than at its
# default, to the same images bit for bit and no slower per call (tools/bench_cpu_compile.py, the bundled model at
# 64 and 256 px); GPUs and TPUs compile with their defaults.
sample = jax.jit(_sample, static_argnames=("models", "sampler", "edge_fill"))
sample_on_cpu = jax.jit(_sample, static_argnames=("models", "sampler", "edge_fill"),
                        compiler_options={"xla_backend_optimization_level": 1})


def _check_count(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{what}: expected an int >= {low}, got {value!r}")
    return int(value)


def run(models: Models, params: dict, mesh: Mesh, scheduler_config: dict, settings: SamplingSettings,
        conditions: Conditions, num_images: int, seed: int, batch_size: int | None = None,
        latents: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(final latents (N, h/f, w/f, C), images (N, h, w, 3) in [0, 1]) for images 0 .. `num_images` - 1 of
    `seed` (or from `latents`, NHWC), `batch_size` at a time, each batch padded to and sharded over the mesh's
    devices. Before the first batch the memory a batch needs is estimated (`memory.check`): a size that does
    not fit is refused with a one-line `memory.OutOfMemory`, as is an allocation XLA fails."""
    num_images, seed = _check_count(num_images, "num_images", 1), _check_count(seed, "seed", 0)
    _check_count(settings.steps, "steps", 1)
    if seed >= 2**32:
        raise ValueError(f"seed: expected an int < 2**32, got {seed}")
    batch_size = _check_count(num_images if batch_size is None else batch_size, "batch_size", 1)
    factor, (height, width) = models.vae_factor, conditions.mask.shape
    shape = (num_images, height // factor, width // factor, models.vae.config.latent_channels)
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        if latents.shape != shape:
            raise ValueError(f"latents: expected NHWC shape {shape} (num_images, height / {factor}, "
                             f"width / {factor}, channels), got {latents.shape}")
    sampler = _sampler(settings.sampler, json.dumps(scheduler_config, sort_keys=True), settings.steps)
    prompts, scalars = conditions.prompt_arrays(), settings.scalars()
    devices, batched = mesh.size, NamedSharding(mesh, P("data"))
    per_device = -(-min(batch_size, num_images) // devices)
    need = memory.check(models, per_device, height, width, mesh.devices.flat[0])
    program = sample_on_cpu if mesh.devices.flat[0].platform == "cpu" else sample

    xs, images = [], []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        padded = -(-n // devices) * devices  # every device gets the same number of images; extras dropped

        def put(a: np.ndarray | None, padded: int = padded) -> jax.Array | None:
            return None if a is None else jax.device_put(np.broadcast_to(a, (padded, *a.shape)), batched)

        given = None
        if latents is not None:
            chunk = latents[start:start + n]
            given = jax.device_put(np.concatenate([chunk, np.zeros((padded - n, *shape[1:]), np.float32)]), batched)
        indices = jax.device_put(np.arange(start, start + padded, dtype=np.int32), batched)
        try:
            x, out = program(models, sampler, params, prompts, np.uint32(seed), indices, given, put(conditions.mask),
                             put(conditions.cg_cond), put(conditions.pg_cond), put(conditions.known), *scalars,
                             edge_fill=conditions.edge_fill)
            xs.append(np.asarray(x)[:n])
            images.append(np.asarray(out)[:n])
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise memory.OutOfMemory(need.message(mesh.devices.flat[0], "XLA ran out of memory")) from None
    return np.concatenate(xs), np.concatenate(images)
