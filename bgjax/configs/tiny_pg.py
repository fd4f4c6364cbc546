"""The bundled demo model, stage 2: PG on synthetic data, CG frozen (tools/train_bundled_model.sh)."""

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
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    # The synthetic tone is PG's to learn in every batch (the prompt does not tell it); half the
    # batches without the prompt make PG carry the category's hue and pattern from the reference too.
    c.loss.prompt_dropout = 0.5
    c.data.pg.mix_probability = 0.2  # regions of another image carry its tone: fewer, so the own tone dominates
    c.num_steps = 1500
    c.log_every = 20
    c.checkpoint_every = 200
    return c
