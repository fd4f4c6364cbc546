"""The train state, the optimizer and one jitted, sharded train step."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bgjax.method.text import IDENTIFIERS
from bgjax.train import sharding
from bgjax.train.losses import stage_loss
from bgjax.train.models import StageModels


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32, updates applied (the EMA's warm-up counts these)
    params: Any  # the trained params, float32
    opt_state: Any
    ema: Any  # EMA of params, or None
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)
    nan_step: jax.Array  # the first step whose loss or gradient was not finite, -1 if none


def learning_rate(config) -> optax.Schedule:
    optim = config.optim
    warmup = optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))
    if optim.schedule == "cosine":
        rest = optax.cosine_decay_schedule(optim.learning_rate, max(config.num_steps - optim.warmup_steps, 1))
    elif optim.schedule == "constant":
        rest = optax.constant_schedule(optim.learning_rate)
    else:
        raise ValueError(f"optim.schedule: {optim.schedule!r} is not cosine or constant")
    return optax.join_schedules([warmup, rest], [optim.warmup_steps])


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with warm-up, global-norm clipping; no weight decay on vectors or identifier embeddings."""
    tables = {jax.tree_util.DictKey(k) for k in IDENTIFIERS.values()}

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, x: x.ndim > 1 and path[0] not in tables, params)

    optim = config.optim
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity(),
        optax.adamw(learning_rate(config), optim.b1, optim.b2, optim.eps, optim.weight_decay, mask=decay_mask),
    )


def ema_decay(optim, update: jax.Array) -> jax.Array:
    """The decay for the `update`-th applied update (1 for the first), as diffusers' EMAModel.get_decay
    computes it for its `optimization_step`: 0 (the EMA takes the params) until `ema_update_after_step`
    have passed, then (1 + t) / (10 + t), or with `ema_warmup` 1 - (1 + t / inv_gamma) ** -power,
    at most `ema_decay` and at least `ema_min_decay`. Without a warm-up the EMA would hold
    ema_decay ** steps of the initial weights (13.5% after 20k steps at 0.9999)."""
    t = jnp.maximum(0, update - optim.ema_update_after_step - 1).astype(jnp.float32)
    warm = 1 - (1 + t / optim.ema_inv_gamma) ** -optim.ema_power if optim.ema_warmup else (1 + t) / (10 + t)
    return jnp.where(t <= 0, 0.0, jnp.maximum(jnp.minimum(warm, optim.ema_decay), optim.ema_min_decay))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
    """ema - (1 - decay) * (ema - params): EMAModel.step's arithmetic."""
    return jax.tree.map(lambda e, p: e - (1 - decay) * (e - p), ema, params)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None,
                      rng=jax.random.PRNGKey(seed), nan_step=jnp.full((), -1, jnp.int32))


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules) -> TrainState:
    return sharding.tree_shardings(abstract_state, mesh, rules)


def _microbatches(batch: dict, n: int) -> dict:
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def train_step(state: TrainState, frozen: dict, batch: dict, *, models: StageModels, tx: optax.GradientTransformation,
               config, empty_prompt: dict | None) -> tuple[TrainState, dict]:
    """One optimizer update. A non-finite loss or gradient leaves the state as it was and records the
    step in `nan_step`; so does every step after it, since the loop reads the flag a step late."""
    loss_fn = functools.partial(stage_loss(models.stage), models, loss_cfg=config.loss, empty_prompt=empty_prompt)
    key = jax.random.fold_in(state.rng, state.step)

    def grad_fn(params, micro):
        def f(p):
            return loss_fn({**frozen, **p}, micro, key)
        return jax.value_and_grad(f, has_aux=True)(params)

    accum = config.optim.accum_steps
    if accum == 1:
        (loss, aux), grads = grad_fn(state.params, batch)
    else:  # a scan keeps one micro-batch's activations live at a time
        micro = _microbatches(batch, accum)
        shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda v: v[0], micro))
        total = jax.lax.scan(lambda carry, m: (jax.tree.map(jnp.add, carry, grad_fn(state.params, m)), None),
                             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), micro)[0]
        (loss, aux), grads = jax.tree.map(lambda x: x / accum, total)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nan_step < 0)

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    ema = state.ema
    if ema is not None:
        ema = keep(update_ema(ema, params, ema_decay(config.optim, state.step + 1)), ema)
    nan_step = jnp.where(~ok & (state.nan_step < 0), state.step, state.nan_step)
    new_state = state.replace(
        step=state.step + ok.astype(jnp.int32), params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state), ema=ema, nan_step=nan_step)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate(config)(state.step),
               "nan_step": nan_step, **aux}
    return new_state, metrics


def program_flops(lowered: jax.stages.Lowered) -> float:
    """FLOPs of a lowered program per device, from XLA's cost analysis of the module before the backend's
    passes: after them a GPU's convolutions and matmuls are cuDNN and cuBLAS custom calls the analysis does
    not count (an H200's compiled SD-1.5 CG step counted 0.84 of its 39.3 TFLOP)."""
    cost = lowered.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost or {}).get("flops", 0.0))


def jit_train_step(models: StageModels, tx: optax.GradientTransformation, config, empty_prompt: dict | None,
                   mesh: Mesh, state_sh: TrainState, frozen_sh: dict):
    """The step jitted over `mesh`: state and frozen params sharded by the rules, the batch over
    data x fsdp, the state's buffers donated."""
    step = functools.partial(train_step, models=models, tx=tx, config=config, empty_prompt=empty_prompt)
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
