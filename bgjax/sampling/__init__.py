"""Diffusion samplers (DDPM, DDIM, DPM-Solver++ 2M, Euler) in JAX, matching diffusers' schedulers."""
