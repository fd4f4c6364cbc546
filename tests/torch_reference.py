"""Reference PyTorch models (diffusers / transformers) with random weights, and array helpers."""

from __future__ import annotations

import numpy as np
import torch

SD1_TINY = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
# SD-2 style: linear projections, per-block head counts, deeper transformers, 3 levels.
SD2_TINY = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 48, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=40, attention_head_dim=(2, 3, 4), use_linear_projection=True,
                transformer_layers_per_block=(1, 2, 1), norm_num_groups=16, upcast_attention=True)
SD15 = dict(sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8)
# diffusers' SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0/unet/config.json).
SDXL = dict(sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)
VAE_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=16, sample_size=32)
CLIP_SD1_TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                     bos_token_id=512, eos_token_id=513, pad_token_id=513)
CLIP_SD2_TINY = dict(CLIP_SD1_TINY, hidden_act="gelu", num_hidden_layers=3)
# SDXL's structure at small widths: no attention on the first level, deeper transformers below (SDXL: 1, 2, 10),
# linear projections, a context of both encoders' widths (CLIP-L 32 + OpenCLIP-G 48; SDXL: 768 + 1280) and
# the added embedding of the pooled text (G's projection, 24; SDXL: 1280) and 6 time ids (8 wide each; SDXL: 256).
CLIP_L_TINY = dict(CLIP_SD1_TINY, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
# 10 blocks: diffusers' single-file loader recognises SDXL base by the 10th block of the second encoder.
CLIP_G_TINY = dict(CLIP_L_TINY, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=24,
                   num_hidden_layers=10)
SDXL_TINY = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 48, 64), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 4), use_linear_projection=True,
                 cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=16)
# SDXL's VAE is SD's architecture with its own scaling factor and force_upcast.
VAE_SDXL_TINY = dict(VAE_TINY, scaling_factor=0.13025, force_upcast=True)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised ControlNet convs too), deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def nchw(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def nhwc(x: torch.Tensor | np.ndarray) -> np.ndarray:
    x = x.detach().numpy() if isinstance(x, torch.Tensor) else x
    return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
