"""Every training option with its default; a config in `bgjax/configs/` (or your own file) starts from this and
sets a few.

Stages: `vae` (autoencoder), `unet` (text-to-image base model), `cg` (stage 1: the Category-Wise
Generator and the identifier embeddings) and `pg` (stage 2: the Personality-Wise Generator).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from bgjax.data.augment import CropConfig, PGAugmentConfig
from bgjax.method.config import MethodConfig


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "cg"
    c.model = ""  # base bgjax model directory; "" when every component comes from `init`
    # Components created with random weights, by kind: a diffusers config dict, or for cg / pg
    # the fields that differ from the UNet's ControlNet config. `tokenizer = "byte"` writes bgjax's
    # byte-level tokenizer; `scheduler` is a diffusers scheduler config dict.
    c.init = ml_collections.ConfigDict()
    # MethodConfig's fields; unset (None): the base model's method.json, else MethodConfig's default
    # (a stage may change only the fields of what it trains: bgjax.train.models.stage_method).
    c.method = ml_collections.ConfigDict({f.name: ml_collections.config_dict.placeholder(type(f.default))
                                          for f in dataclasses.fields(MethodConfig)})
    c.dtype = "bfloat16"  # compute dtype; trained params stay float32
    c.attention = "auto"  # attention kernel: auto (per backend), xla, cudnn or flash (bgjax.models.attention)
    # Gradient checkpointing: the UNet's and the branches' resnets and transformer blocks recompute their
    # activations in the backward pass (one more forward) instead of keeping them; what SDXL at 1024 px needs.
    c.remat = False
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # records written by `bgjax data ...`
    c.data.tfds = ""  # or a prepared TFDS dataset with bgjax's features, e.g. "bg60k/bg60k" (bgjax.data.tfds_bg60k)
    c.data.tfds_data_dir = ""  # where it was prepared ("": $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.tfds_split = ""  # "": its only split
    c.data.synthetic_num = 0  # > 0 and no dir: write this many synthetic samples into WORKDIR/data
    c.data.synthetic_size = 128
    c.data.batch_size = 16  # global, over all processes
    c.data.workers = 0
    c.data.crop = dataclasses.asdict(CropConfig())
    c.data.pg = dataclasses.asdict(PGAugmentConfig())  # used by the pg stage only

    c.loss = ml_collections.ConfigDict()
    c.loss.prompt_dropout = 0.1  # the empty prompt instead, so classifier-free guidance works
    c.loss.noise_offset = 0.0
    c.loss.min_snr_gamma = 0.0  # 0: plain MSE
    c.loss.kl_weight = 1e-6  # vae stage

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "constant"  # or cosine
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 1e-2
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global norm; 0 disables
    # EMA of the trained params, as diffusers' EMAModel: its decay warms up, (1 + t) / (10 + t) after t
    # applied updates (or with ema_warmup, 1 - (1 + t / ema_inv_gamma) ** -ema_power), capped at ema_decay.
    c.optim.ema_decay = 0.0  # 0: no EMA
    c.optim.ema_warmup = False  # diffusers' use_ema_warmup
    c.optim.ema_inv_gamma = 1.0
    c.optim.ema_power = 2 / 3
    c.optim.ema_min_decay = 0.0
    c.optim.ema_update_after_step = 0  # updates before the EMA starts averaging (it copies the params)
    c.optim.accum_steps = 1  # micro-batches per update

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: the devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis -> mesh axis. Conv kernels are (h, w, embed, mlp), dense kernels (embed, mlp).
    c.mesh.rules = (("embed", "fsdp"), ("mlp", "tensor"))

    c.num_steps = 1000
    c.export_weights = "ema"  # what DIR/model gets: "ema" (the EMA when optim.ema_decay > 0, else raw) or "raw"
    # A resume refuses a config or data change that breaks exact resume (bgjax/train/resume.py lists
    # the harmless ones), naming the field; True resumes anyway and logs the changes.
    c.resume_force = False
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.sample_every = 0  # 0: no sample grids
    c.sample_steps = 20
    c.num_samples = 4  # validation products in a grid (one per category first)
    c.peak_tflops = 0.0  # per device, for MFU; 0 = from the device kind when known
    return c
