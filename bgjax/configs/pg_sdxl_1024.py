"""Stage 2 on an SDXL base: PG on BG60k over stage 1's model (SDXL and CG frozen), 1024 px.

    bgjax train --config pg_sdxl_1024 --config.model=runs/cg_sdxl/model --workdir runs/pg_sdxl

FSDP over 8 devices as cg_sdxl_1024; see the README for the measured memory per device.
"""

from bgjax.train import presets


def get_config():
    return presets.sdxl_1024("pg", "runs/cg_sdxl/model")
