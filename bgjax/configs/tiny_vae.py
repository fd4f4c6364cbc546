"""The bundled demo model, stage 0a: a small VAE on synthetic 64 px images (tools/train_bundled_model.sh)."""

from bgjax.train import presets
from bgjax.train.defaults import default_config


def get_config():
    c = default_config()
    c.stage = "vae"
    c.init = {"vae": presets.TINY_VAE}
    c.dtype = "float32"
    c.data.dir = "runs/synthetic64"
    c.data.batch_size = 16
    c.data.crop.resolution = 64
    c.data.crop.scale_range = (0.6, 1.0)
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    c.loss.kl_weight = 1e-4
    c.num_steps = 500
    c.log_every = 50
    c.checkpoint_every = 250
    return c
