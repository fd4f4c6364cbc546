"""Stage 2 at paper scale: PG on BG60k over stage 1's model (SD-1.5 and CG frozen), 512 px.

The references are the self-supervised perturbations of each image; --config.model is stage 1's
trained model (default runs/cg_sd15/model).

    bgjax train --config pg_sd15_512 --config.model=runs/cg_sd15/model --workdir runs/pg_sd15
"""

from bgjax.train import presets


def get_config():
    return presets.paper_scale("pg", "runs/cg_sd15/model")
