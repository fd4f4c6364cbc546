"""bgjax: product background generation with Stable Diffusion + category/personality branches, in JAX."""

__version__ = "0.1.0"
