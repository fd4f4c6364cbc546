"""Component configs (diffusers / transformers `config.json` dicts) for small models trained from
scratch: the bundled demo model and tests. Sized to train in minutes on a laptop CPU at 64 px."""

from __future__ import annotations

import ml_collections

from bgjax.models.byte_tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE
from bgjax.train.defaults import default_config

TINY_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "norm_num_groups": 16,
    "sample_size": 64, "scaling_factor": 1.0,  # the vae stage measures it (1 / std of the latents)
}
TINY_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": VOCAB_SIZE,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    "pad_token_id": EOS_ID,
}
TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 64,
    "attention_head_dim": 4, "norm_num_groups": 16,
}
# CG / PG see the full-size image; their conditioning embedding downsamples it by 2 ** (len - 1),
# which must equal the VAE's factor (4 here, 8 for SD).
TINY_BRANCH = {"conditioning_embedding_out_channels": [16, 32, 32]}
SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1,
}

# Stable Diffusion 1.5's shapes (diffusers' configs), for random-weight benchmarks and memory reports.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
SD15_RANDOM = {"vae": SD15_VAE, "text_encoder": SD15_TEXT_ENCODER, "unet": SD15_UNET, "tokenizer": "byte",
               "scheduler": SCHEDULER}

# SDXL base's shapes (stabilityai/stable-diffusion-xl-base-1.0's configs), for random-weight memory reports.
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT_ENCODER = {**SD15_TEXT_ENCODER, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                     "projection_dim": 768}
SDXL_TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280, "bos_token_id": 0,
    "eos_token_id": 2, "pad_token_id": 1,
}
SDXL_SCHEDULER = {**SCHEDULER, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading",
                  "interpolation_type": "linear", "use_karras_sigmas": False}
SDXL_RANDOM = {"vae": SDXL_VAE, "text_encoder": SDXL_TEXT_ENCODER, "text_encoder_2": SDXL_TEXT_ENCODER_2,
               "unet": SDXL_UNET, "tokenizer": "byte", "scheduler": SDXL_SCHEDULER}
# SDXL's structure at tiny shapes (both encoders, the added "text_time" embedding, deeper transformers at the
# lower level): CPU rehearsals of the SDXL benchmarks.
TINY_SDXL_UNET = {
    **TINY_UNET, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
    "use_linear_projection": True, "cross_attention_dim": 128, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
TINY_SDXL_TEXT_ENCODER_2 = {**TINY_TEXT_ENCODER, "architectures": ["CLIPTextModelWithProjection"],
                            "hidden_act": "gelu", "projection_dim": 32}
TINY_SDXL_RANDOM = {"vae": TINY_VAE, "text_encoder": TINY_TEXT_ENCODER, "text_encoder_2": TINY_SDXL_TEXT_ENCODER_2,
                    "unet": TINY_SDXL_UNET, "tokenizer": "byte", "scheduler": SDXL_SCHEDULER}


def paper_scale(stage: str, model: str) -> ml_collections.ConfigDict:
    """The paper-scale run on BG60k at 512 px, shared by both stages (configs/cg_sd15_512, pg_sd15_512)."""
    c = default_config()
    c.stage = stage
    c.model = model
    c.data.dir = "data/bg60k"
    c.data.batch_size = 256  # global
    c.data.workers = 8
    c.data.crop.resolution = 512
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 500
    c.optim.schedule = "cosine"
    c.optim.ema_decay = 0.9999
    c.loss.min_snr_gamma = 5.0
    c.num_steps = 20_000
    c.log_every = 50
    c.checkpoint_every = 1000
    c.sample_every = 1000
    return c


def sdxl_1024(stage: str, model: str) -> ml_collections.ConfigDict:
    """The paper's run on an SDXL base at 1024 px (configs/cg_sdxl_1024, pg_sdxl_1024): FSDP over 8 devices,
    gradient checkpointing, and on 8 devices one image per device per micro-batch (256 / (8 x 32))."""
    c = paper_scale(stage, model)
    c.data.crop.resolution = 1024
    c.mesh.fsdp = 8
    c.remat = True
    c.optim.accum_steps = 32
    return c
