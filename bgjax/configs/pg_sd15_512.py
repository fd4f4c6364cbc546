"""Stage 2 at paper scale: PG on BG60k over stage 1's model (SD-1.5 and CG frozen), 512 px.

The references are the self-supervised perturbations of each image; --config.model is stage 1's
trained model (default runs/cg_sd15/model).

    bgjax train --config pg_sd15_512 --config.model=runs/cg_sd15/model --workdir runs/pg_sd15
"""

from bgjax.train.defaults import default_config


def get_config():
    c = default_config()
    c.stage = "pg"
    c.model = "runs/cg_sd15/model"
    c.data.dir = "data/bg60k"
    c.data.batch_size = 256
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
