"""bgjax.sampling.schedulers against diffusers' PyTorch schedulers, step by step, in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from bgjax.sampling.schedulers import SAMPLERS, NoiseSchedule, Sampler, make_sampler

SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
CONFIGS = {
    "sd": SD,  # no timestep_spacing: each class's own default (leading / linspace)
    "sd_v_trailing": {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    # Zero terminal SNR (Lin et al. 2024), with the v-prediction it needs: the first step sees pure noise.
    "sd_v_zero_snr": {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                      "rescale_betas_zero_snr": True},
    "defaults": {},  # linear betas, clip_sample and set_alpha_to_one True for DDPM / DDIM
}
SHAPE = (2, 8, 8, 4)
TOL = 1e-5


def torch_scheduler(name: str, config: dict):
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                   lower_order_final=True,
                                                   use_karras_sigmas=name == "dpmpp_2m_karras")


def model(x, t, lib):
    """A stand-in denoiser that depends on the sample, so step errors compound."""
    return 0.3 * x + lib.sin(t / 100.0)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def initial_noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def run_torch(name: str, config: dict, n: int, x: np.ndarray) -> tuple[object, np.ndarray, np.ndarray]:
    """diffusers' trajectory (one sample per step) and the standard normal noise DDPM drew at each step."""
    sched = torch_scheduler(name, config)
    sched.set_timesteps(n)
    xt = torch.from_numpy(x) * sched.init_noise_sigma
    samples, noises = [], []
    for i, t in enumerate(sched.timesteps):
        out = model(sched.scale_model_input(xt, t), t.float(), torch)
        # randn_tensor with a CPU generator is torch.randn, so a same-seeded generator reproduces DDPM's draw.
        noises.append(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).numpy())
        extra = {"generator": torch.Generator().manual_seed(i)} if name == "ddpm" else {}
        xt = sched.step(out, t, xt, **extra).prev_sample
        samples.append(xt.numpy())
    return sched, np.stack(samples), np.stack(noises)


def jitted_step(sampler: Sampler):
    """One model call + sampler step, jitted once with a traced step index."""

    @jax.jit
    def one(state, x, i, noise):
        out = model(sampler.scale_model_input(x, i), sampler.timestep(i), jnp)
        return sampler.step(state, out, i, x, noise=noise)

    return one


@pytest.mark.parametrize("n", [25, 50])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", SAMPLERS)
def test_matches_diffusers_every_step(name: str, config_name: str, n: int):
    config = CONFIGS[config_name]
    x = initial_noise()
    if name == "dpmpp_2m_karras" and config.get("rescale_betas_zero_snr"):
        with pytest.raises(IndexError):  # diffusers has no trajectory to match: bgjax refuses
            run_torch(name, config, n, x)
        with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
            make_sampler(name, config, n)
        return
    sched, expected, noises = run_torch(name, config, n, x)
    sampler = make_sampler(name, config, n)

    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy())
    assert sampler.timesteps.dtype == sched.timesteps.numpy().dtype
    assert sampler.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)

    one = jitted_step(sampler)
    xj = jnp.asarray(x) * sampler.init_noise_sigma
    state = sampler.init_state(xj)
    for i in range(n):
        xj, state = one(state, xj, i, jnp.asarray(noises[i]))
        err = rel_err(xj, expected[i])
        assert err <= TOL, f"{name} {config_name} step {i}/{n} (t={sampler.timesteps[i]}): rel err {err:.2e}"


def test_clip_sample_is_exercised():
    """The "defaults" config only checks DDPM / DDIM clipping if x0 actually leaves [-1, 1]."""
    sched = DDIMScheduler.from_config(CONFIGS["defaults"])
    sched.set_timesteps(25)
    xt, t = torch.from_numpy(initial_noise()), sched.timesteps[0]
    unclipped = DDIMScheduler.from_config({"clip_sample": False})
    unclipped.set_timesteps(25)
    x0 = unclipped.step(model(xt, t.float(), torch), t, xt).pred_original_sample
    assert x0.abs().max() > 1


@pytest.mark.parametrize("name", SAMPLERS)
def test_scale_model_input_matches_diffusers(name: str):
    sched = torch_scheduler(name, SD)
    sched.set_timesteps(25)
    sampler = make_sampler(name, SD, 25)
    x = initial_noise()
    for i in (0, 7, 24):
        if hasattr(sched, "_step_index"):
            sched._step_index = i
        expected = sched.scale_model_input(torch.from_numpy(x), sched.timesteps[i]).numpy()
        assert rel_err(sampler.scale_model_input(jnp.asarray(x), i), expected) <= 1e-6


def test_ddim_scan_compiles_once_and_equals_step_loop():
    sampler = make_sampler("ddim", SD, 25)
    traces = []

    @jax.jit
    def sample(x: jax.Array) -> jax.Array:
        traces.append(None)

        def body(carry, i):
            x, state = carry
            out = model(sampler.scale_model_input(x, i), sampler.timestep(i), jnp)
            return sampler.step(state, out, i, x), None

        (x, _), _ = jax.lax.scan(body, (x, sampler.init_state(x)), jnp.arange(sampler.num_inference_steps))
        return x

    x1, x2 = jnp.asarray(initial_noise(1)), jnp.asarray(initial_noise(2))
    scanned = sample(x1)
    sample(x2)
    assert len(traces) == 1

    x, state = x1, sampler.init_state(x1)
    for i, t in enumerate(sampler.timesteps):
        x, state = sampler.step(state, model(x, jnp.float32(t), jnp), i, x)
    assert rel_err(scanned, np.asarray(x)) <= 1e-6


@pytest.mark.parametrize("name", SAMPLERS)
def test_fori_loop_equals_step_loop(name: str):
    """Every sampler under jit + fori_loop, DDPM drawing its noise from a key."""
    sampler = make_sampler(name, CONFIGS["sd_v_trailing"], 10)
    key = jax.random.key(0)

    def step(i, carry):
        x, state = carry
        out = model(sampler.scale_model_input(x, i), sampler.timestep(i), jnp)
        return sampler.step(state, out, i, x, key=jax.random.fold_in(key, i))

    x0 = jnp.asarray(initial_noise()) * sampler.init_noise_sigma
    looped = jax.jit(lambda x: jax.lax.fori_loop(0, 10, step, (x, sampler.init_state(x)))[0])(x0)
    carry, one = (x0, sampler.init_state(x0)), jax.jit(step)
    for i in range(10):
        carry = one(i, carry)
    assert rel_err(looped, np.asarray(carry[0])) <= 1e-6


def test_ddpm_key_draws_standard_normal_noise_and_is_required():
    sampler = make_sampler("ddpm", SD, 50)
    x, out, key = jnp.asarray(initial_noise()), jnp.asarray(initial_noise(1)), jax.random.key(3)
    with_key, _ = sampler.step((), out, 5, x, key=key)
    with_noise, _ = sampler.step((), out, 5, x, noise=jax.random.normal(key, SHAPE))
    np.testing.assert_allclose(with_key, with_noise, rtol=1e-6)
    with pytest.raises(ValueError, match="key"):
        sampler.step((), out, 5, x)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_noise_schedule_matches_diffusers(beta_schedule: str):
    config = {**SD, "beta_schedule": beta_schedule}
    schedule, sched = NoiseSchedule.from_config(config), DDPMScheduler.from_config(config)
    assert schedule.alphas_cumprod.dtype == np.float32
    np.testing.assert_allclose(schedule.betas, sched.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=1e-6)


def test_zero_terminal_snr_schedule_matches_diffusers():
    """diffusers' `rescale_zero_terminal_snr` in float32 differs from this float64 one by float32 rounding
    amplified where ᾱ is ~1e-7 (betas up to 7e-6 apart); without the rescale ᾱ_999 is 0.0047, not 0."""
    config = CONFIGS["sd_v_zero_snr"]
    schedule, sched = NoiseSchedule.from_config(config), DDPMScheduler.from_config(config)
    np.testing.assert_allclose(schedule.betas, sched.betas.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(schedule.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=1e-4, atol=1e-9)
    assert schedule.alphas_cumprod[-1] == 0 and schedule.betas[-1] == 1
    x0, noise = initial_noise(1), initial_noise(2)
    np.testing.assert_array_equal(schedule.add_noise(jnp.asarray(x0), jnp.asarray(noise), 999), noise)
    np.testing.assert_array_equal(schedule.velocity(jnp.asarray(x0), jnp.asarray(noise), 999), -x0)
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule.from_config({**config, "prediction_type": "epsilon"})


def test_add_noise_and_velocity_match_diffusers():
    schedule, sched = NoiseSchedule.from_config(SD), DDPMScheduler.from_config(SD)
    x0, noise = initial_noise(1), initial_noise(2)
    t = np.array([999, 0], np.int64)
    pairs = [(schedule.add_noise, sched.add_noise), (schedule.velocity, sched.get_velocity)]
    for ours, theirs in pairs:
        expected = theirs(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
        got = jax.jit(ours)(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
        assert rel_err(got, expected) <= 1e-6
        scalar = theirs(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([500])).numpy()
        assert rel_err(ours(jnp.asarray(x0), jnp.asarray(noise), 500), scalar) <= 1e-6


@pytest.mark.parametrize(("field", "value"), [
    ("beta_schedule", "cosine"), ("prediction_type", "sample"), ("timestep_spacing", "uniform"),
    ("num_train_timesteps", 0), ("steps_offset", -1), ("clip_sample", "no"), ("beta_start", 0.0),
    ("trained_betas", [0.01] * 1000), ("rescale_betas_zero_snr", "yes"), ("thresholding", True),
    ("variance_type", "learned_range"), ("final_sigmas_type", "sigma_min"), ("timestep_type", "continuous"),
    ("use_exponential_sigmas", True),
])
def test_unsupported_config_values_name_the_field(field: str, value):
    for name in ("ddim", "dpmpp_2m"):
        with pytest.raises(ValueError, match=field):
            make_sampler(name, {**SD, field: value}, 25)


def test_bad_name_and_step_count():
    with pytest.raises(ValueError, match="sampler name"):
        make_sampler("pndm", SD, 25)
    for n in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            make_sampler("euler", SD, n)


@pytest.mark.parametrize(("name", "config_name"), [
    (name, config_name) for config_name in ("sd", "sd_v_trailing", "sd_v_zero_snr") for name in SAMPLERS
    if (name, config_name) != ("dpmpp_2m_karras", "sd_v_zero_snr")  # refused, see test_matches_diffusers_every_step
])
def test_renoised_matches_diffusers_add_noise_at_the_next_timestep(name: str, config_name: str):
    """Keeping a known region (`Sampler.renoised`) as diffusers' inpainting pipelines do with a 4-channel UNet:
    after step i the known x0 noised by `scheduler.add_noise` to timesteps[i + 1], and x0 itself after the
    last step."""
    n = 25
    sched = torch_scheduler(name, CONFIGS[config_name])
    sched.set_timesteps(n)
    sampler = make_sampler(name, CONFIGS[config_name], n)
    x0, noise = initial_noise(1), initial_noise(2)
    renoised = jax.jit(sampler.renoised)
    for i in range(n):
        if i < n - 1:
            expected = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), sched.timesteps[i + 1:i + 2])
            expected = expected.numpy()
        else:
            expected = x0
        err = rel_err(renoised(jnp.asarray(x0), jnp.asarray(noise), i), expected)
        assert err <= 1e-6, f"{name} {config_name} step {i}: rel err {err:.2e}"
