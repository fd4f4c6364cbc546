"""Stage 1 at paper scale: CG and the per-category identifiers on BG60k, SD-1.5 frozen, 512 px.

    bgjax convert stable-diffusion-v1-5/ --out models/sd15
    bgjax data bg60k --root BG60k/ --out data/bg60k
    bgjax train --config cg_sd15_512 --workdir runs/cg_sd15

On a TPU pod or several GPU hosts add --distributed; for a model that does not fit a device's
memory, --config.mesh.fsdp=8 shards params and optimizer state over 8 devices.
"""

from bgjax.train import presets


def get_config():
    return presets.paper_scale("cg", "models/sd15")
