"""The bundled demo model, stage 2: PG on synthetic data, CG frozen (see docs/bundled_model.md)."""

from bgjax.train.defaults import default_config


def get_config():
    c = default_config()
    c.stage = "pg"
    c.model = "runs/tiny_cg/model"
    c.dtype = "float32"
    c.data.dir = "runs/synthetic64"
    c.data.batch_size = 16
    c.data.crop.resolution = 64
    c.data.crop.scale_range = (0.8, 1.0)
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    # Synthetic backgrounds are set by the category, so with the prompt present PG has little to add;
    # half the batches without it make PG the source of the style.
    c.loss.prompt_dropout = 0.5
    c.num_steps = 800
    c.log_every = 20
    c.checkpoint_every = 200
    return c
