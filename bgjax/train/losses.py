"""Each stage's loss on one batch: pure functions of (params, batch, key), traced inside the train step.

Randomness is drawn per example from `fold_in(key, example_seed)`, so an example gets the same
noise whatever its position in the batch, the number of devices or processes, or the micro-batching.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bgjax.data.pg_render import pg_condition
from bgjax.method.text import TextConditioning
from bgjax.models.region import Region
from bgjax.models.unet import AddedCond
from bgjax.models.vae import sample_latent
from bgjax.train.models import StageModels

PROMPT_KEYS = ("input_ids", "input_ids_2", "fg_tokens", "bg_tokens", "identifier_index")


def example_keys(key: jax.Array, batch: dict, n: int) -> list[jax.Array]:
    """`n` independent (B,) key arrays, one key per example."""
    per_example = jax.vmap(lambda s: jax.random.fold_in(key, s))(batch["example_seed"])
    return list(jax.vmap(lambda k: jax.random.split(k, n))(per_example).swapaxes(0, 1))


def _normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def images(batch: dict) -> jax.Array:
    return batch["image"].astype(jnp.float32) / 127.5 - 1.0


def latents(models: StageModels, params: dict, batch: dict, key: jax.Array) -> jax.Array:
    """z = s * (sample of the VAE posterior - shift), from cached moments when the records have them."""
    if "latent_mean" in batch:
        mean, logvar = batch["latent_mean"].astype(jnp.float32), batch["latent_logvar"].astype(jnp.float32)
    else:
        mean, logvar = models.vae.apply({"params": params["vae"]}, images(batch), method="encode")
    z = jax.vmap(sample_latent)(key, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar))
    cfg = models.vae.config
    return (z - cfg.shift_factor) * cfg.scaling_factor


def text_context(models: StageModels, params: dict, prompts: dict) -> TextConditioning:
    """E (and SDXL's pooled embedding): the text encoders' states, each category's identifier e_c spliced in."""
    return models.text_encoders(params, prompts)


def time_ids(batch: dict) -> jax.Array:
    """SDXL's time ids per example: original (h, w), crop (top, left), target (h, w) = the training crop's size."""
    if "crop_top_left" not in batch:
        raise ValueError("the batch has no crop geometry (original_size, crop_top_left) for SDXL's time ids: a "
                         "latent cache written before bgjax kept it; cache the data again "
                         "(bgjax.data.latents.cache_latents)")
    target = jnp.broadcast_to(jnp.asarray(batch["image"].shape[1:3]), batch["crop_top_left"].shape)
    return jnp.concatenate([batch["original_size"], batch["crop_top_left"], target], axis=-1).astype(jnp.float32)


def drop_prompts(batch: dict, empty: dict, drop: jax.Array) -> dict:
    """The batch's prompt arrays with the empty prompt where `drop` (B,) is true."""
    out = {}
    for k in (k for k in PROMPT_KEYS if k in batch):
        where = drop.reshape(drop.shape + (1,) * (batch[k].ndim - 1))
        out[k] = jnp.where(where, jnp.asarray(empty[k]), batch[k])
    out["identifier_row"] = batch["identifier_row"]
    return out


def snr_weight(models: StageModels, t: jax.Array, gamma: float) -> jax.Array:
    """min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    alpha_bar = jnp.asarray(models.schedule.alphas_cumprod)[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = jnp.minimum(snr, gamma)
    return clipped / (snr + 1.0) if models.schedule.prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(models: StageModels, params: dict, batch: dict, key: jax.Array, loss_cfg,
                   empty_prompt: dict) -> tuple[jax.Array, dict]:
    """The denoising loss of the unet / cg / pg stages (DESIGN.md section 1)."""
    k_latent, k_noise, k_offset, k_t, k_drop = example_keys(key, batch, 5)
    z = latents(models, params, batch, k_latent)
    noise = _normal(k_noise, z.shape[1:])
    if loss_cfg.noise_offset:
        noise = noise + loss_cfg.noise_offset * _normal(k_offset, (1, 1, z.shape[-1]))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, models.schedule.num_train_timesteps))(k_t)
    z_t = models.schedule.add_noise(z, noise, t)
    target = noise if models.schedule.prediction_type == "epsilon" else models.schedule.velocity(z, noise, t)

    drop = jax.vmap(lambda k: jax.random.uniform(k) < loss_cfg.prompt_dropout)(k_drop)
    prompts = drop_prompts(batch, empty_prompt, drop)
    text = text_context(models, params, prompts)
    if models.zeros_for_empty_prompt:
        text = text.zeroed(drop)
    added = None if text.pooled is None else AddedCond(text.pooled, time_ids(batch))
    mask = batch["mask"].astype(jnp.float32)
    region = Region(mask, prompts["fg_tokens"], prompts["bg_tokens"])
    image = images(batch)
    denoiser = models.denoiser
    cg_cond = image * mask[..., None] if denoiser.cg is not None else None
    pg_cond = pg_condition(batch) if denoiser.pg is not None else None
    pred = denoiser(params, z_t, t, text.context, region, cg_cond, pg_cond, models.method.lambda_cg,
                    models.method.lambda_pg, added)
    per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
    if loss_cfg.min_snr_gamma:
        per_example = per_example * snr_weight(models, t, loss_cfg.min_snr_gamma)
    return jnp.mean(per_example), {}


def vae_loss(models: StageModels, params: dict, batch: dict, key: jax.Array, loss_cfg,
             empty_prompt: dict | None = None) -> tuple[jax.Array, dict]:
    """Reconstruction MSE plus `kl_weight` x KL(posterior || N(0, I)) per latent element."""
    (k_latent,) = example_keys(key, batch, 1)
    x = images(batch)
    mean, logvar = models.vae.apply({"params": params["vae"]}, x, method="encode")
    z = jax.vmap(sample_latent)(k_latent, mean, logvar)
    recon = models.vae.apply({"params": params["vae"]}, z, method="decode").astype(jnp.float32)
    mse = jnp.mean(jnp.square(recon - x))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return mse + loss_cfg.kl_weight * kl, {"kl": kl}


def stage_loss(stage: str):
    return vae_loss if stage == "vae" else diffusion_loss
