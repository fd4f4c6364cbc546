"""Noise schedule and samplers in JAX that match diffusers' PyTorch schedulers step by step.

Everything that depends only on the schedule and the number of inference steps (timesteps, sigmas,
per-step coefficients) is computed on the host, in float64 from diffusers' float32 schedule, and kept
as float32 numpy tables. `step` only gathers row `step_index` of those tables, so the index may be
traced and one `step` serves a whole `lax.scan` / `fori_loop` sampling loop:

    sampler = make_sampler("dpmpp_2m", scheduler_config, 25)
    x = noise * sampler.init_noise_sigma

    def body(carry, i):
        x, state = carry
        out = unet(sampler.scale_model_input(x, i), sampler.timestep(i))
        return sampler.step(state, out, i, x), None

    (x, _), _ = jax.lax.scan(body, (x, sampler.init_state(x)), jnp.arange(sampler.num_inference_steps))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Config fields with a non-default value change the math in ways not implemented here. Sampler-identity
# fields (algorithm_type, solver_order, solver_type, use_karras_sigmas, ...) are ignored: the name decides.
_DEFAULT_ONLY: dict[str, tuple] = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "variance_type": (None, "fixed_small"),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero",),
    "lambda_min_clipped": (-math.inf,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
}

# A missing field takes the default of the diffusers class the sampler mirrors; only this one differs.
_DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace", "dpmpp_2m_karras": "linspace",
                    "euler": "linspace"}

StepIndex = int | jax.Array


def _bad(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"scheduler config field {field!r}={value!r} is not supported: expected {expected}")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The discrete forward process of a diffusers `scheduler_config.json` (diffusers' defaults).

    `betas` and `alphas_cumprod` are float32 as diffusers holds them, up to the last bit of torch's float32
    `linspace` (its CPU `cumprod` accumulates in float64, as here). Hashable by identity, so jitted
    functions can close over it.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    betas: np.ndarray = dataclasses.field(init=False, repr=False)
    alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise _bad("num_train_timesteps", n, "an int >= 2")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise _bad("beta_schedule", self.beta_schedule, f"one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise _bad("prediction_type", self.prediction_type, f"one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise _bad("timestep_spacing", self.timestep_spacing, f"one of {TIMESTEP_SPACINGS}")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise _bad("steps_offset", self.steps_offset, "an int >= 0")
        for field in ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr"):
            if not isinstance(getattr(self, field), bool):
                raise _bad(field, getattr(self, field), "a bool")
        if not 0 < self.beta_start < 1:
            raise _bad("beta_start", self.beta_start, "a float in (0, 1)")
        if not 0 < self.beta_end < 1:
            raise _bad("beta_end", self.beta_end, "a float in (0, 1)")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            # At zero terminal SNR the last timestep holds no signal, so an epsilon model cannot give x0 there
            # (diffusers' DDIM divides by zero).
            raise _bad("rescale_betas_zero_snr", True, "False with prediction_type 'epsilon' (use v_prediction)")

        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        else:  # squaredcos_cap_v2: Nichol & Dhariwal's cosine schedule, betas capped at 0.999
            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
        betas = betas.astype(np.float32)
        if self.rescale_betas_zero_snr:
            betas = _zero_terminal_snr(betas)
        alphas = np.float32(1.0) - betas
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(alphas.astype(np.float64)).astype(np.float32))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """From a diffusers scheduler config dict; unrelated keys are ignored, unsupported values raise."""
        for field, allowed in _DEFAULT_ONLY.items():
            value = config.get(field, allowed[0])
            if not (isinstance(value, bool | int | float | str | None) and value in allowed):
                raise _bad(field, value, " or ".join(map(repr, allowed)))
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        return cls(**{k: config[k] for k in names if k in config})

    @property
    def final_alpha_cumprod(self) -> float:
        """ᾱ one step past the end of a DDIM chain."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    @functools.cached_property
    def sigmas(self) -> np.ndarray:
        """sqrt((1 - ᾱ_t) / ᾱ_t) per training timestep, float32 as diffusers computes it. At zero terminal
        SNR, diffusers' sigma-space schedulers (Euler, DPM-Solver) take the last ᾱ as 2^-24 so the first
        sigma is finite (4096)."""
        ac = self.alphas_cumprod.copy()
        if self.rescale_betas_zero_snr:
            ac[-1] = np.float32(2.0**-24)
        return np.sqrt((np.float32(1.0) - ac) / ac)

    @functools.cached_property
    def _sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @functools.cached_property
    def _sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(np.float32(1.0) - self.alphas_cumprod)

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise; `t` is one int or one per leading (batch) row."""
        a = _per_row(self._sqrt_alphas_cumprod, t, x0)
        s = _per_row(self._sqrt_one_minus_alphas_cumprod, t, x0)
        return a * x0 + s * noise

    def velocity(self, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
        """The v-prediction training target sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0."""
        a = _per_row(self._sqrt_alphas_cumprod, t, x0)
        s = _per_row(self._sqrt_one_minus_alphas_cumprod, t, x0)
        return a * noise - s * x0


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2024), Algorithm 1, as diffusers' `rescale_zero_terminal_snr`: shift and scale sqrt(ᾱ) so
    it keeps its first value and ends at exactly 0, i.e. the last timestep is pure noise."""
    root = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = root[0], root[-1]
    alpha_bar = ((root - last) * (first / (first - last))) ** 2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def _per_row(table: np.ndarray, t: jax.Array | int, like: jax.Array) -> jax.Array:
    c = jnp.asarray(table)[jnp.asarray(t)].astype(like.dtype)
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim))


def _mix(table: np.ndarray, i: StepIndex, *xs: jax.Array) -> jax.Array:
    """sum_k table[i, k] * xs[k]."""
    c = jnp.asarray(table)[i]
    out = c[0] * xs[0]
    for k in range(1, len(xs)):
        out = out + c[k] * xs[k]
    return out


def _x0_eps_tables(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (c_x, c_m) with x0 = c_x x + c_m m and eps = c_x' x + c_m' m, for x = alpha x0 + sigma eps."""
    if prediction_type == "epsilon":
        x0 = np.stack([1 / alpha, -sigma / alpha], -1)
        eps = np.stack([np.zeros_like(alpha), np.ones_like(alpha)], -1)
    else:  # v = alpha eps - sigma x0
        x0 = np.stack([alpha, -sigma], -1)
        eps = np.stack([sigma, alpha], -1)
    return x0.astype(np.float32), eps.astype(np.float32)


def _spaced_timesteps(s: NoiseSchedule, n: int, extra: int = 0) -> np.ndarray:
    """diffusers' `set_timesteps` spacing, descending, float64. DPM-Solver spaces `n + 1` points for
    linspace / leading and drops the last (`extra=1`)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= s.num_train_timesteps:
        raise ValueError(f"num_inference_steps={n!r}: expected an int in [1, {s.num_train_timesteps}]")
    T = s.num_train_timesteps
    if s.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n + extra).round()[::-1][:n]
    if s.timestep_spacing == "leading":
        return (np.arange(n + extra) * (T // (n + extra))).round()[::-1][:n] + s.steps_offset
    return np.round(np.arange(T, 0, -T / n)) - 1


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' piecewise-linear inverse of log sigma(t), op for op (log_sigmas is float32 there too)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: uniform in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A sampler for a fixed number of inference steps. `timesteps` is a host array (static).

    `step(state, model_output, step_index, sample, key=None, noise=None) -> (prev_sample, state)` is pure;
    `step_index` may be traced. Hashable by identity, so jitted functions can close over it.
    """

    name: str
    schedule: NoiseSchedule
    timesteps: np.ndarray
    init_noise_sigma: float

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def timestep(self, step_index: StepIndex) -> jax.Array:
        """The model's timestep at `step_index`, as float32."""
        return jnp.asarray(self.timesteps.astype(np.float32))[step_index]

    def init_state(self, sample: jax.Array) -> Any:
        """The multistep state (a pytree) before the first step."""
        return ()

    def scale_model_input(self, sample: jax.Array, step_index: StepIndex) -> jax.Array:
        """The sample as the model expects it at `step_index`."""
        return sample

    def step(self, state: Any, model_output: jax.Array, step_index: StepIndex, sample: jax.Array,
             key: jax.Array | None = None, noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """One step from timesteps[step_index] to the next. `key` / `noise` feed stochastic samplers."""
        raise NotImplementedError

    def renoised(self, x0: jax.Array, noise: jax.Array, step_index: StepIndex) -> jax.Array:
        """What the sample should hold after step `step_index` where x0 is known: x0 noised to the next
        timestep (`noise` a fixed standard normal draw), x0 itself after the last step; as diffusers'
        inpainting pipelines keep the known region with a 4-channel UNet (`scheduler.add_noise(x0, noise,
        timesteps[i + 1])`)."""
        last = self.num_inference_steps - 1
        t_next = jnp.asarray(self.timesteps)[jnp.minimum(step_index + 1, last)]
        return jnp.where(step_index < last, self.schedule.add_noise(x0, noise, t_next), x0)


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) (`DDPMScheduler`, variance "fixed_small")."""

    x0_table: np.ndarray  # (N, 2): x0 from (sample, model_output)
    mean_table: np.ndarray  # (N, 2): posterior mean from (x0, sample)
    noise_std: np.ndarray  # (N,)

    @classmethod
    def create(cls, s: NoiseSchedule, num_inference_steps: int) -> DDPMSampler:
        ts = _spaced_timesteps(s, num_inference_steps).astype(np.int64)
        ac = s.alphas_cumprod
        a_t, a_prev = ac[ts], np.append(ac[ts[1:]], np.float32(1.0))
        # 1 - ᾱ_t / ᾱ_prev cancels near t = 0; taking it in float32 like diffusers keeps the two within 1e-5 there.
        beta_t = (np.float32(1.0) - a_t / a_prev).astype(np.float64)
        a_t, a_prev = a_t.astype(np.float64), a_prev.astype(np.float64)
        x0_table, _ = _x0_eps_tables(s.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
        mean = np.stack([np.sqrt(a_prev) * beta_t / (1 - a_t), np.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)], -1)
        variance = np.maximum((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
        # diffusers adds noise whenever t > 0, so also at the last step (with std 1e-10) when steps_offset > 0.
        std = np.where(ts > 0, np.sqrt(variance), 0.0)
        return cls("ddpm", s, ts, 1.0, x0_table, mean.astype(np.float32), std.astype(np.float32))

    def step(self, state: Any, model_output: jax.Array, step_index: StepIndex, sample: jax.Array,
             key: jax.Array | None = None, noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """Needs a fresh `key` per step (e.g. fold_in(key, step_index)) or explicit standard normal `noise`."""
        if noise is None:
            if key is None:
                raise ValueError("DDPM sampling is stochastic: pass `key` or `noise` to step")
            noise = jax.random.normal(key, sample.shape, jnp.promote_types(sample.dtype, jnp.float32))
        x0 = _mix(self.x0_table, step_index, sample, model_output)
        if self.schedule.clip_sample:
            x0 = jnp.clip(x0, -self.schedule.clip_sample_range, self.schedule.clip_sample_range)
        prev = _mix(self.mean_table, step_index, x0, sample) + jnp.asarray(self.noise_std)[step_index] * noise
        return prev.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSampler(Sampler):
    """Deterministic DDIM, eta = 0 (`DDIMScheduler`)."""

    x0_table: np.ndarray  # (N, 2): x0 from (sample, model_output)
    eps_table: np.ndarray  # (N, 2): eps from (sample, model_output)
    prev_table: np.ndarray  # (N, 2): x_prev from (x0, eps)

    @classmethod
    def create(cls, s: NoiseSchedule, num_inference_steps: int) -> DDIMSampler:
        ts = _spaced_timesteps(s, num_inference_steps).astype(np.int64)
        ac = s.alphas_cumprod.astype(np.float64)
        # diffusers steps back by T // n whatever the spacing, not to the next listed timestep.
        prev_t = ts - s.num_train_timesteps // num_inference_steps
        a_t = ac[ts]
        a_prev = np.where(prev_t >= 0, ac[np.maximum(prev_t, 0)], s.final_alpha_cumprod)
        x0_table, eps_table = _x0_eps_tables(s.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
        prev = np.stack([np.sqrt(a_prev), np.sqrt(1 - a_prev)], -1).astype(np.float32)
        return cls("ddim", s, ts, 1.0, x0_table, eps_table, prev)

    def step(self, state: Any, model_output: jax.Array, step_index: StepIndex, sample: jax.Array,
             key: jax.Array | None = None, noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        x0 = _mix(self.x0_table, step_index, sample, model_output)
        if self.schedule.clip_sample:
            x0 = jnp.clip(x0, -self.schedule.clip_sample_range, self.schedule.clip_sample_range)
        eps = _mix(self.eps_table, step_index, sample, model_output)
        return _mix(self.prev_table, step_index, x0, eps).astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++ 2M, midpoint (`DPMSolverMultistepScheduler`, algorithm_type "dpmsolver++", solver_order 2,
    final sigma 0). The state is the previous step's x0 prediction."""

    sigmas: np.ndarray  # (N + 1,) float32, ending in 0
    x0_table: np.ndarray  # (N, 2): x0 from (sample, model_output)
    update_table: np.ndarray  # (N, 3): x_next from (sample, x0, previous x0)

    @classmethod
    def create(cls, s: NoiseSchedule, num_inference_steps: int, karras: bool = False) -> DPMSolverPP2MSampler:
        ts = _spaced_timesteps(s, num_inference_steps, extra=1)
        if karras:
            sig = _karras_sigmas(float(s.sigmas[0]), float(s.sigmas[-1]), num_inference_steps)
            ts = _sigma_to_t(sig, np.log(s.sigmas))
            if s.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sig = np.interp(ts, np.arange(s.num_train_timesteps), s.sigmas)
        sigmas = np.append(sig, 0.0).astype(np.float32)

        sig = sigmas.astype(np.float64)
        alpha = 1 / np.sqrt(sig**2 + 1)
        sigma = sig * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at the final sigma 0
        h = lam[1:] - lam[:-1]
        # First-order update x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) x0; it returns x0 exactly
        # at the final sigma 0.
        c_x, c_d = sigma[1:] / sigma[:-1], -alpha[1:] * np.expm1(-h)
        # Second order from step 1 to N-2: x0 -> x0 + (x0 - prev_x0) / (2 r), r = h_prev / h. diffusers' first
        # step has no history, and its last (final sigma 0) is first order ("lower_order_final").
        k = np.zeros_like(h)
        k[1:-1] = 0.5 * h[1:-1] / h[:-2]
        update = np.stack([c_x, c_d * (1 + k), -c_d * k], -1).astype(np.float32)
        x0_table, _ = _x0_eps_tables(s.prediction_type, alpha[:-1], sigma[:-1])
        name = "dpmpp_2m_karras" if karras else "dpmpp_2m"
        return cls(name, s, ts.astype(np.int64), 1.0, sigmas, x0_table, update)

    def init_state(self, sample: jax.Array) -> jax.Array:
        return jnp.zeros(sample.shape, jnp.promote_types(sample.dtype, jnp.float32))

    def renoised(self, x0: jax.Array, noise: jax.Array, step_index: StepIndex) -> jax.Array:
        """(x0 + sigma_next noise) / sqrt(sigma_next^2 + 1): from the sampler's own sigmas, which with Karras
        sigmas are not those of the rounded timesteps (`DPMSolverMultistepScheduler.add_noise`)."""
        sigma = jnp.asarray(self.sigmas)[step_index + 1]
        return (x0 + sigma * noise) / jnp.sqrt(sigma**2 + 1)

    def step(self, state: jax.Array, model_output: jax.Array, step_index: StepIndex, sample: jax.Array,
             key: jax.Array | None = None, noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        x0 = _mix(self.x0_table, step_index, sample, model_output)
        prev = _mix(self.update_table, step_index, sample, x0, state)
        return prev.astype(sample.dtype), x0.astype(state.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class EulerSampler(Sampler):
    """Euler on the probability-flow ODE in sigma, s_churn = 0 (`EulerDiscreteScheduler`). Samples live in
    the x / alpha scale: start from noise * init_noise_sigma and feed the model `scale_model_input`."""

    sigmas: np.ndarray  # (N + 1,) float32, ending in 0
    input_scale: np.ndarray  # (N,) sqrt(sigma^2 + 1)
    x0_table: np.ndarray  # (N, 2): x0 from (sample, model_output)
    update_table: np.ndarray  # (N, 2): x_next from (sample, x0)

    @classmethod
    def create(cls, s: NoiseSchedule, num_inference_steps: int) -> EulerSampler:
        if s.timestep_spacing == "linspace":  # unrounded, unlike the other samplers
            _spaced_timesteps(s, num_inference_steps)
            ts = np.linspace(0, s.num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
        else:
            ts = _spaced_timesteps(s, num_inference_steps).astype(np.float32)
        sigmas = np.append(np.interp(ts, np.arange(s.num_train_timesteps), s.sigmas), 0.0).astype(np.float32)
        sigma = sigmas[:-1]
        one = np.float32(1.0)
        input_scale = np.sqrt(sigma**2 + one)
        # diffusers scales the initial noise to the Gaussian's std only for leading spacing.
        top = sigmas.max()
        init_noise_sigma = float(top if s.timestep_spacing in ("linspace", "trailing") else np.sqrt(top**2 + one))
        sig = sigma.astype(np.float64)
        if s.prediction_type == "epsilon":
            x0_table = np.stack([np.ones_like(sig), -sig], -1)
        else:
            x0_table = np.stack([1 / (sig**2 + 1), -sig / np.sqrt(sig**2 + 1)], -1)
        # x + (x - x0) / sigma * (sigma_next - sigma), rearranged: diffusers' form cancels two terms of size
        # sigma_max, which costs float32 ~1e-3 relative at the cosine schedule's sigma_max of 2e4.
        ratio = sigmas[1:].astype(np.float64) / sig
        update = np.stack([ratio, 1 - ratio], -1)
        return cls("euler", s, ts, init_noise_sigma, sigmas, input_scale, x0_table.astype(np.float32),
                   update.astype(np.float32))

    def scale_model_input(self, sample: jax.Array, step_index: StepIndex) -> jax.Array:
        return sample / jnp.asarray(self.input_scale)[step_index].astype(sample.dtype)

    def renoised(self, x0: jax.Array, noise: jax.Array, step_index: StepIndex) -> jax.Array:
        """x0 + sigma_next noise: Euler's samples are in the sigma scale (`EulerDiscreteScheduler.add_noise`);
        sigma is 0 after the last step."""
        return x0 + jnp.asarray(self.sigmas)[step_index + 1] * noise

    def step(self, state: Any, model_output: jax.Array, step_index: StepIndex, sample: jax.Array,
             key: jax.Array | None = None, noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        x0 = _mix(self.x0_table, step_index, sample, model_output)
        return _mix(self.update_table, step_index, sample, x0).astype(sample.dtype), state


def make_sampler(name: str, config: Mapping[str, Any], num_inference_steps: int) -> Sampler:
    """Sampler `name` (one of SAMPLERS) for a diffusers scheduler config dict.

    Fields missing from `config` take the defaults of the diffusers class the sampler mirrors
    (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler), as its
    `from_config(config)` would; e.g. a config without `timestep_spacing` gives "leading" for DDPM / DDIM
    but "linspace" for DPM-Solver / Euler. Solver fields in `config` (algorithm_type, solver_order,
    use_karras_sigmas, ...) are ignored: `name` decides.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler name {name!r} is not supported: expected one of {SAMPLERS}")
    schedule = NoiseSchedule.from_config({"timestep_spacing": _DEFAULT_SPACING[name], **config})
    if name == "dpmpp_2m_karras" and schedule.rescale_betas_zero_snr:
        # Karras sigmas from 4096 round their first timesteps to the same 999; diffusers then steps past the
        # end of its sigmas (IndexError), so there is no reference to match.
        raise ValueError("sampler 'dpmpp_2m_karras' does not support rescale_betas_zero_snr=True: "
                         "use dpmpp_2m, ddim, ddpm or euler")
    if name == "ddpm":
        return DDPMSampler.create(schedule, num_inference_steps)
    if name == "ddim":
        return DDIMSampler.create(schedule, num_inference_steps)
    if name == "euler":
        return EulerSampler.create(schedule, num_inference_steps)
    return DPMSolverPP2MSampler.create(schedule, num_inference_steps, karras=name == "dpmpp_2m_karras")
