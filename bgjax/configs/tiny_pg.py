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
    c.data.crop.flip_probability = 0.0  # as tiny_unet: one diagonal for the table fan
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    # The synthetic tone is PG's to learn in every batch (the prompt does not tell it); the hue and pattern
    # too when the prompt is dropped (half the batches) or names another category (30 %, before the dropout):
    # a reference of another category then restyles the background against the prompt. (Dropout 0.3 with
    # swap 0.5 carried the hue better but lost the pastel tone.)
    c.loss.prompt_dropout = 0.5
    c.data.pg.prompt_swap_probability = 0.3
    c.data.pg.mix_probability = 0.2  # regions of another image carry its tone: fewer, so the own tone dominates
    c.num_steps = 1500
    c.log_every = 20
    c.checkpoint_every = 200
    return c
