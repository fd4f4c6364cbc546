"""The bundled demo model, stage 1: CG and its identifiers over the tiny UNet (tools/train_bundled_model.sh).

tiny_synthetic's recipe on the 2000 images the other stages use, five times as long: at 200 steps
(1.6 epochs) CG drew table fans on running shoes' backgrounds."""

from bgjax.configs import tiny_synthetic


def get_config():
    c = tiny_synthetic.get_config()
    c.model = "runs/tiny_unet/model"
    c.data.dir = "runs/synthetic64"
    c.optim.schedule = "cosine"
    c.data.crop.flip_probability = 0.0  # as tiny_unet: one diagonal for the table fan
    c.num_steps = 1000
    c.log_every = 50
    c.checkpoint_every = 250
    return c
