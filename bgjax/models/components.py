"""The model components of a pipeline, built from their config dicts by name."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bgjax.models.configs import SDXL_TIME_IDS, TEXT_TIME, CLIPTextConfig, UNetConfig, VAEConfig
from bgjax.models.controlnet import ControlNetModel
from bgjax.models.text_encoder import CLIPTextModel, CLIPTextModelWithProjection
from bgjax.models.unet import AddedCond, UNet2DConditionModel
from bgjax.models.vae import AutoencoderKL


@dataclasses.dataclass(frozen=True)
class Component:
    config_cls: type
    module_cls: type[nn.Module]
    diffusers_class: str
    weights_name: str  # the file name diffusers / transformers save this component under
    options: dict = dataclasses.field(default_factory=dict)  # module fields beyond the config


COMPONENTS: dict[str, Component] = {
    "unet": Component(UNetConfig, UNet2DConditionModel, "UNet2DConditionModel",
                      "diffusion_pytorch_model.safetensors"),
    "controlnet": Component(UNetConfig, ControlNetModel, "ControlNetModel", "diffusion_pytorch_model.safetensors"),
    # The paper's branches: ControlNets whose cross-attention sees the product region.
    "cg": Component(UNetConfig, ControlNetModel, "ControlNetModel", "diffusion_pytorch_model.safetensors",
                    {"region_mode": "mask_guided"}),
    "pg": Component(UNetConfig, ControlNetModel, "ControlNetModel", "diffusion_pytorch_model.safetensors",
                    {"region_mode": "mask_output"}),
    "vae": Component(VAEConfig, AutoencoderKL, "AutoencoderKL", "diffusion_pytorch_model.safetensors"),
    "text_encoder": Component(CLIPTextConfig, CLIPTextModel, "CLIPTextModel", "model.safetensors"),
    # SDXL's second text encoder (OpenCLIP ViT-bigG), with the projection giving the pooled embedding.
    "text_encoder_2": Component(CLIPTextConfig, CLIPTextModelWithProjection, "CLIPTextModelWithProjection",
                                "model.safetensors"),
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def build(kind: str, config: dict | Any, dtype: jnp.dtype = jnp.float32, **options) -> nn.Module:
    """The Flax module of `kind` for a config dict (or an already parsed config).

    `options` override the component's module fields (e.g. `mask_residuals=True` for PG).
    """
    comp = COMPONENTS[kind]
    if isinstance(config, dict):
        config = comp.config_cls.from_dict(config)
    return comp.module_cls(config, dtype=dtype, **{**comp.options, **options})


def example_inputs(kind: str, module: nn.Module, batch: int = 1, latent_size: int = 8) -> tuple:
    """Smallest valid inputs for `module.init` / shape inference."""
    cfg = module.config
    if kind in TEXT_ENCODERS:
        return (jnp.zeros((batch, cfg.max_position_embeddings), jnp.int32),)
    if kind == "vae":
        return (jnp.zeros((batch, 8 * latent_size, 8 * latent_size, cfg.in_channels)),)
    latents = jnp.zeros((batch, latent_size, latent_size, cfg.in_channels))
    context = jnp.zeros((batch, 1, cfg.cross_attention_dim))
    if kind in ("controlnet", "cg", "pg"):
        f = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        cond = jnp.zeros((batch, f * latent_size, f * latent_size, cfg.conditioning_channels))
        return latents, jnp.zeros((batch,)), context, cond
    return latents, jnp.zeros((batch,)), context


def example_added(module: nn.Module, batch: int = 1) -> AddedCond | None:
    """Zero added conditioning (pooled text embedding, SDXL's 6 time ids) for a "text_time" UNet / ControlNet."""
    cfg = module.config
    if not isinstance(cfg, UNetConfig) or cfg.addition_embed_type != TEXT_TIME:
        return None
    return AddedCond(jnp.zeros((batch, cfg.pooled_text_dim)), jnp.zeros((batch, SDXL_TIME_IDS)))


def _min_latent(kind: str, module: nn.Module) -> int:
    return 1 if kind in (*TEXT_ENCODERS, "vae") else 2 ** (len(module.config.block_out_channels) - 1)


def init_params(kind: str, module: nn.Module, rng: jax.Array) -> dict:
    added = example_added(module)
    kwargs = {} if added is None else {"added": added}
    return module.init(rng, *example_inputs(kind, module, latent_size=_min_latent(kind, module)), **kwargs)["params"]


def param_shapes(kind: str, module: nn.Module) -> dict:
    """The param tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(kind, module, jax.random.key(0)))
