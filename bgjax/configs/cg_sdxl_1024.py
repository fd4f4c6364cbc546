"""Stage 1 on an SDXL base: CG and the per-category identifiers (in both text encoders) on BG60k, 1024 px.

    bgjax convert stable-diffusion-xl-base-1.0/ --out models/sdxl
    bgjax data bg60k --root BG60k/ --out data/bg60k
    bgjax train --config cg_sdxl_1024 --workdir runs/cg_sdxl

FSDP over 8 devices (params, gradients and AdamW state of the 1.25 G-param CG, and the frozen SDXL
models, split 8 ways); see the README for the measured memory per device.
"""

from bgjax.train import presets


def get_config():
    return presets.sdxl_1024("cg", "models/sdxl")
