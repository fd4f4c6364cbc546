"""CG (stage 1) of a small model on synthetic data: learns in minutes on a laptop CPU.

    bgjax train --config tiny_synthetic --config.model=MODEL --workdir runs/tiny_cg

MODEL is a small base model (the tiny_vae config, then tiny_unet); with
--config.model='' every component is created fresh, which is what the tests do.
"""

from bgjax.train import presets
from bgjax.train.defaults import default_config


def get_config():
    c = default_config()
    c.stage = "cg"
    c.init = {"vae": presets.TINY_VAE, "text_encoder": presets.TINY_TEXT_ENCODER, "unet": presets.TINY_UNET,
              "cg": presets.TINY_BRANCH, "tokenizer": "byte", "scheduler": presets.SCHEDULER}
    c.dtype = "float32"  # the CPU has no fast bf16
    c.data.synthetic_num = 512
    c.data.synthetic_size = 64
    c.data.batch_size = 16
    c.data.crop.resolution = 64
    c.data.crop.scale_range = (0.8, 1.0)
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.num_steps = 200
    c.log_every = 10
    c.checkpoint_every = 100
    return c
