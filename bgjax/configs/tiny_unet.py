"""The bundled demo model, stage 0b: a small text-to-image UNet on synthetic 64 px images.

It trains over the tiny VAE, with a random frozen text encoder (tools/train_bundled_model.sh runs every stage)."""

from bgjax.train import presets
from bgjax.train.defaults import default_config


def get_config():
    c = default_config()
    c.stage = "unet"
    c.model = "runs/tiny_vae/model"
    c.init = {"text_encoder": presets.TINY_TEXT_ENCODER, "unet": presets.TINY_UNET, "tokenizer": "byte",
              "scheduler": presets.SCHEDULER}
    c.dtype = "float32"
    c.data.dir = "runs/synthetic64"
    c.data.batch_size = 16
    c.data.crop.resolution = 64
    c.data.crop.scale_range = (0.8, 1.0)
    # No horizontal flip: it turns the table fan's diagonal stripes into the other diagonal, so one prompt
    # would be taught both (the other styles are unchanged by a flip).
    c.data.crop.flip_probability = 0.0
    c.loss.prompt_dropout = 0.1
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.99
    c.num_steps = 2000  # 600 left CG to lean on guidance 7.5 for every category's style
    c.log_every = 50
    c.checkpoint_every = 500
    return c
