"""Stage 1 at paper scale: CG and the per-category identifiers on BG60k, SD-1.5 frozen, 512 px.

    bgjax convert stable-diffusion-v1-5/ --out models/sd15
    bgjax data bg60k --root BG60k/ --out data/bg60k
    bgjax train --config cg_sd15_512 --workdir runs/cg_sd15

On a TPU pod or several GPU hosts add --distributed; for a model that does not fit a device's
memory, --config.mesh.fsdp=8 shards params and optimizer state over 8 devices.
"""

from bgjax.train.defaults import default_config


def get_config():
    c = default_config()
    c.stage = "cg"
    c.model = "models/sd15"
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
